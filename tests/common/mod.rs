//! Helpers for black-box tests: start a trireme binary by path, talk raw HTTP/1.1 to it,
//! and stop only the processes we started, by PID.

#![allow(dead_code, unused_imports)]

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use trireme::demo::{pattern, Backend};

/// One `#[test]` per scenario and runtime binary (`#[macro_use] mod common;`).
macro_rules! matrix {
    ($($scenario:ident),* $(,)?) => {
        $(
            mod $scenario {
                #[test]
                fn tokio() {
                    super::$scenario(&super::bin("trireme-tokio"));
                }
                #[test]
                fn mio() {
                    super::$scenario(&super::bin("trireme-mio"));
                }
                #[test]
                fn monoio() {
                    super::$scenario(&super::bin("trireme-monoio"));
                }
            }
        )*
    };
}

/// Path of a binary built for this test run.
pub fn bin(name: &str) -> PathBuf {
    match name {
        "trireme-tokio" => PathBuf::from(env!("CARGO_BIN_EXE_trireme-tokio")),
        "trireme-mio" => PathBuf::from(env!("CARGO_BIN_EXE_trireme-mio")),
        "trireme-monoio" => PathBuf::from(env!("CARGO_BIN_EXE_trireme-monoio")),
        other => panic!("unknown binary {other}"),
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running proxy process; killed (by PID) when dropped.
pub struct Proxy {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: PathBuf,
}

impl Proxy {
    /// Start `bin` with `args`; `{listen}` in an argument is replaced by the chosen address.
    pub fn start(bin: &PathBuf, args: &[String]) -> Proxy {
        Self::start_on(bin, args, free_port())
    }

    fn start_on(bin: &PathBuf, args: &[String], port: u16) -> Proxy {
        Self::start_env(bin, args, port, &[])
    }

    /// As [`start`](Self::start), with extra environment variables.
    pub fn start_with_env(bin: &PathBuf, args: &[String], env: &[(&str, &str)]) -> Proxy {
        Self::start_env(bin, args, free_port(), env)
    }

    fn start_env(bin: &PathBuf, args: &[String], port: u16, env: &[(&str, &str)]) -> Proxy {
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let args: Vec<String> = args
            .iter()
            .map(|a| a.replace("{listen}", &addr.to_string()))
            .collect();
        let log =
            std::env::temp_dir().join(format!("trireme-test-{}-{port}.log", std::process::id()));
        let child = Command::new(bin)
            .args(&args)
            .envs(env.iter().copied())
            .env("TRIREME_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start proxy");
        let p = Proxy { child, addr, log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "proxy did not listen: {}",
                p.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    /// Config-less start in front of these backends.
    pub fn with_backends(bin: &PathBuf, backends: &[&Backend], extra: &[&str]) -> Proxy {
        let mut args = vec!["--listen".to_string(), "{listen}".to_string()];
        for b in backends {
            args.push("--backend".into());
            args.push(format!("http://{}", b.addr));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Proxy::start(bin, &args)
    }

    /// Config-less start in front of one backend at `addr` (a [`Rogue`] one, say).
    pub fn in_front_of(bin: &PathBuf, addr: SocketAddr, extra: &[&str]) -> Proxy {
        let url = format!("http://{addr}");
        let mut args = vec!["--backend", url.as_str()];
        args.extend_from_slice(extra);
        Proxy::with_backends(bin, &[], &args)
    }

    /// Start with a YAML config; `{listen}` and `{b0}`, `{b1}`... are substituted.
    pub fn with_config(bin: &PathBuf, yaml: &str, backends: &[&Backend]) -> Proxy {
        let port = free_port();
        let mut y = yaml.replace("{listen}", &format!("127.0.0.1:{port}"));
        for (i, b) in backends.iter().enumerate() {
            y = y.replace(&format!("{{b{i}}}"), &b.addr.to_string());
        }
        let path =
            std::env::temp_dir().join(format!("trireme-test-{}-{port}.yaml", std::process::id()));
        std::fs::write(&path, y).unwrap();
        Proxy::start_on(bin, &["--config".into(), path.display().to_string()], port)
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn sigterm(&self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
    }

    /// Peak resident memory of the proxy process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Assert the proxy's peak RSS grew by less than `max_kib` since `from_kib` (an earlier
    /// [`peak_rss_kib`](Self::peak_rss_kib)) while doing `what`.
    pub fn assert_rss_growth_below(&self, from_kib: u64, max_kib: u64, what: &str) {
        let peak = self.peak_rss_kib();
        assert!(peak > 0, "the proxy is gone:\n{}", self.logs());
        assert!(
            peak.saturating_sub(from_kib) < max_kib,
            "proxy RSS grew from {from_kib} KiB to {peak} KiB {what}"
        );
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // What the proxy said, for the failed test's output.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "--- proxy log ---\n{}", self.logs());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw HTTP/1.1 client on one connection.
pub struct Client {
    pub rd: BufReader<TcpStream>,
    pub w: TcpStream,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect(addr).expect("connect to proxy"))
    }

    /// A client on a connected stream (keep a clone to shut a side down).
    pub fn from_stream(s: TcpStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_nodelay(true).unwrap();
        Client {
            w: s.try_clone().unwrap(),
            rd: BufReader::new(s),
        }
    }

    pub fn send(&mut self, raw: &[u8]) {
        self.w.write_all(raw).expect("write");
    }

    pub fn get(&mut self, path: &str) -> Response {
        self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes());
        self.read_response(false).expect("response")
    }

    /// Read one response; `None` if the connection closed first.
    pub fn read_response(&mut self, head: bool) -> Option<Response> {
        let (line, headers) = trireme::demo::read_head(&mut self.rd)?;
        let status: u16 = line.split_whitespace().nth(1)?.parse().ok()?;
        let no_body = head || status == 204 || status == 304 || (100..200).contains(&status);
        let body = if no_body {
            Vec::new()
        } else {
            trireme::demo::read_body(&mut self.rd, &headers, true)?
        };
        Some(Response {
            status,
            headers,
            body,
        })
    }

    /// True when the proxy closed the connection within the timeout: EOF, or a reset (a
    /// connection still in the accept queue when a listener closes is reset by the kernel).
    pub fn closed_within(&mut self, t: Duration) -> bool {
        self.w.set_read_timeout(Some(t)).unwrap();
        let mut b = [0u8; 1];
        match self.rd.read(&mut b) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    }
}

/// One GET on a fresh connection.
pub fn get(addr: SocketAddr, path: &str) -> Response {
    Client::connect(addr).get(path)
}

/// Count requests per backend name.
pub fn by_backend(resps: &[Response]) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in resps {
        *m.entry(r.header("x-backend").unwrap_or("?").to_string())
            .or_insert(0) += 1;
    }
    m
}

/// A `redis-server` started from the installed binary on a free loopback port, without
/// persistence; killed (by PID) when dropped. `scripts/test.sh` installs it.
pub struct Redis {
    child: Child,
    pub addr: SocketAddr,
    password: Option<String>,
}

impl Redis {
    pub fn start() -> Redis {
        Self::start_with(None)
    }

    /// With `requirepass`: clients must `AUTH` first.
    pub fn start_with(password: Option<&str>) -> Redis {
        let port = free_port();
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(pw) = password {
            args.extend(["--requirepass".to_string(), pw.to_string()]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is not installed: run scripts/test.sh (it installs it), or apt-get install redis-server");
        let r = Redis {
            child,
            addr: format!("127.0.0.1:{port}").parse().unwrap(),
            password: password.map(str::to_string),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while r.try_command(&["PING"]).is_none() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// Send `commands` (after `AUTH` when a password is set) on one connection; the last
    /// one's one-line reply.
    fn try_commands(&self, commands: &[&[&str]]) -> Option<String> {
        self.exchange(commands, 1)
    }

    /// [`try_commands`](Self::try_commands) where the last reply takes `last_lines` lines
    /// (an array of simple values); its last line.
    fn exchange(&self, commands: &[&[&str]], last_lines: usize) -> Option<String> {
        let mut s = TcpStream::connect(self.addr).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let auth: Vec<&str> = self
            .password
            .iter()
            .flat_map(|pw| ["AUTH", pw.as_str()])
            .collect();
        let all: Vec<&[&str]> = std::iter::once(&auth[..])
            .filter(|a| !a.is_empty())
            .chain(commands.iter().copied())
            .collect();
        let mut cmd = String::new();
        for args in &all {
            cmd.push_str(&format!("*{}\r\n", args.len()));
            for a in *args {
                cmd.push_str(&format!("${}\r\n{a}\r\n", a.len()));
            }
        }
        s.write_all(cmd.as_bytes()).ok()?;
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        while got.windows(2).filter(|w| w == b"\r\n").count() < all.len() - 1 + last_lines {
            let n = s.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        let text = String::from_utf8_lossy(&got).into_owned();
        Some(text.lines().last().unwrap_or("").to_string())
    }

    fn try_command(&self, args: &[&str]) -> Option<String> {
        self.try_commands(&[args])
    }

    /// One command's one-line reply (after `AUTH` when a password is set).
    pub fn command(&self, args: &[&str]) -> String {
        self.try_command(args).expect("redis answers")
    }

    /// Number of keys stored (database 0).
    pub fn keys(&self) -> u64 {
        self.keys_in(0)
    }

    /// Number of keys stored in database `db`.
    pub fn keys_in(&self, db: u32) -> u64 {
        let db = db.to_string();
        let r = self
            .try_commands(&[&["SELECT", &db], &["DBSIZE"]])
            .expect("redis answers");
        r.trim()
            .strip_prefix(':')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("DBSIZE: {r}"))
    }

    /// Wait (bounded) until `n` clients subscribe to `channel`; how many did.
    pub fn wait_subscribers(&self, channel: &str, n: u64) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // *2, $len, channel, :count
            let got = self
                .exchange(&[&["PUBSUB", "NUMSUB", channel]], 4)
                .and_then(|r| r.trim().strip_prefix(':')?.parse().ok())
                .unwrap_or(0);
            if got >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Wait (bounded) until the key count satisfies `ok`.
    pub fn wait_keys(&self, ok: impl Fn(u64) -> bool) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = self.keys();
            if ok(n) || Instant::now() > deadline {
                return n;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The value of a Prometheus counter or gauge in `metrics` text.
pub fn metric(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing in {metrics}"))
}

/// GET /metrics from an admin listener.
pub fn admin_metrics(admin: SocketAddr) -> String {
    admin_call(admin, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").text()
}

/// One raw request to an admin listener.
pub fn admin_call(admin: SocketAddr, req: &str) -> Response {
    let mut c = Client::connect(admin);
    c.send(req.as_bytes());
    c.read_response(false).expect("admin answers")
}

/// What a [`Rogue`] backend does for one request: bytes to send, pauses, a close.
#[derive(Clone, Debug)]
pub enum Step {
    Send(Vec<u8>),
    Sleep(Duration),
    Close,
}

/// A backend that breaks the rules on purpose: each request is answered by the steps its
/// script returns (bytes past the framing, late bytes, closes without saying so). Records
/// requests and connections like [`Backend`]; stops (by its own flag) when dropped.
pub struct Rogue {
    pub addr: SocketAddr,
    pub received: std::sync::Arc<std::sync::Mutex<Vec<trireme::demo::Received>>>,
    pub connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Rogue {
    pub fn start(
        script: impl Fn(&trireme::demo::Received) -> Vec<Step> + Send + Sync + 'static,
    ) -> Rogue {
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let r = Rogue {
            addr: l.local_addr().unwrap(),
            received: Default::default(),
            connections: Default::default(),
            stop: Default::default(),
        };
        let (received, connections, stop) =
            (r.received.clone(), r.connections.clone(), r.stop.clone());
        let script = std::sync::Arc::new(script);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let Ok((s, _)) = l.accept() else {
                    std::thread::sleep(Duration::from_millis(2));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                let id = connections.fetch_add(1, Ordering::SeqCst);
                let (received, stop, script) = (received.clone(), stop.clone(), script.clone());
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut rd = BufReader::new(s);
                    while let Some((line, headers)) = trireme::demo::read_head(&mut rd) {
                        let body =
                            trireme::demo::read_body(&mut rd, &headers, false).unwrap_or_default();
                        let mut it = line.split_whitespace();
                        let req = trireme::demo::Received {
                            method: it.next().unwrap_or("").to_string(),
                            target: it.next().unwrap_or("").to_string(),
                            headers,
                            body,
                            conn: id,
                        };
                        let steps = script(&req);
                        received.lock().unwrap().push(req);
                        for st in steps {
                            if stop.load(Ordering::Relaxed) {
                                return;
                            }
                            match st {
                                Step::Send(b) => {
                                    if w.write_all(&b).is_err() {
                                        return;
                                    }
                                }
                                Step::Sleep(d) => std::thread::sleep(d),
                                Step::Close => {
                                    let _ = w.shutdown(std::net::Shutdown::Both);
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        r
    }

    pub fn requests(&self) -> Vec<trireme::demo::Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Rogue {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
