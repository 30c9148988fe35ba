#![no_main]
//! The chunked decoder over arbitrary input in arbitrary splits: never panics, and data
//! ranges always lie inside the input given.
use libfuzzer_sys::fuzz_target;
use trireme_core::http1::body::{Chunk, ChunkedDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((&split, rest)) = data.split_first() else { return };
    let step = 1 + split as usize;
    let mut d = ChunkedDecoder::new();
    for piece in rest.chunks(step) {
        let mut pos = 0;
        while pos < piece.len() {
            match d.decode(&piece[pos..]) {
                Ok((used, c)) => {
                    if let Some(Chunk::Data(r)) = c {
                        assert!(r.end <= piece.len() - pos);
                    }
                    if used == 0 {
                        return;
                    }
                    pos += used;
                }
                Err(_) => return,
            }
        }
    }
});
