#![no_main]
use libfuzzer_sys::fuzz_target;
use trireme_core::http1::{parse_request, parse_response, Limits};

fuzz_target!(|data: &[u8]| {
    let _ = parse_request(data, &Limits::default());
    let _ = parse_response(data, 64 * 1024);
});
