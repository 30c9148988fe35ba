//! Command line: `--config FILE`, or a config-less start with `--listen` / `--backend` /
//! `--algorithm`; `check --config FILE`; `demo`; `--version`.

use crate::process;
use crate::runtimes::Runtime;
use clap::{Parser, Subcommand};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use trireme_core::balance::Algorithm;
use trireme_core::config::{AlgorithmName, BackendSection, BackendUrl, Config, FileConfig};
use trireme_core::proxy::ProxyContext;
use trireme_core::shutdown::Shutdown;

#[derive(Parser, Debug)]
#[command(version, about = "trireme: reverse proxy and load balancer", long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// YAML config file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Listen address (overrides server.listen), e.g. 0.0.0.0:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Backend URL, repeatable: http://HOST:PORT, optionally with ",weight=N" and
    /// ",max_conns=N" (requests in flight to it at most).
    #[arg(long = "backend", value_name = "URL")]
    backends: Vec<String>,
    /// Balancing algorithm: round_robin, least_conn, ip_hash, consistent_hash, p2c.
    #[arg(long)]
    algorithm: Option<String>,
    /// Enable the in-memory HTTP cache with this many bytes (overrides cache.size), e.g. 64MB.
    #[arg(long, value_name = "SIZE")]
    cache: Option<String>,
    /// Share the cache through this Redis (L2; overrides cache.l2.host/port), e.g. 127.0.0.1:6379.
    #[arg(long = "cache-l2", value_name = "HOST:PORT")]
    cache_l2: Option<String>,
    /// Serve the listener over TLS with this PEM certificate chain (leaf first), with the
    /// --tls-key given in the same place. Repeatable: a client's SNI name picks the
    /// certificate that names it (exactly, or by a `*.` wildcard); the first is the default.
    #[arg(long = "tls-cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Vec<PathBuf>,
    /// The PEM private key of the --tls-cert in the same place (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Vec<PathBuf>,
    /// Admin listener for /metrics and cache purge (overrides admin.listen), e.g. 127.0.0.1:9901.
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Worker threads (overrides server.workers; NUM_ACCEPTORS in the environment too).
    #[arg(long, env = "NUM_ACCEPTORS")]
    workers: Option<usize>,
    /// Log filter (tracing env-filter syntax), e.g. info, debug, trireme_core=debug.
    #[arg(long, env = "TRIREME_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Validate a config file and exit (non-zero with the error on failure).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Start embedded demo backends on loopback and the proxy in front of them.
    Demo {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Number of demo backends.
        #[arg(long, default_value_t = 3)]
        backends: usize,
        #[arg(long, default_value = "round_robin")]
        algorithm: String,
    },
}

/// `println!` / `eprintln!` panic when the stream is closed (`trireme ... 2>&1 | head -2`),
/// and a panic aborts the process: these drop a failed write instead.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! complain {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn resolve(host: &str, port: u16) -> Result<SocketAddr, String> {
    (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve `{host}`: {e}"))?
        .next()
        .ok_or_else(|| format!("`{host}` resolves to no address"))
}

/// `--backend URL[,weight=N][,max_conns=N]`.
fn backend_from_arg(s: &str) -> Result<BackendSection, String> {
    let mut parts = s.split(',');
    let url =
        BackendUrl::parse(parts.next().unwrap_or("")).map_err(|e| format!("--backend {e}"))?;
    let mut b = BackendSection {
        url,
        weight: 1,
        max_conns: 0,
    };
    for opt in parts {
        let (k, v) = opt.split_once('=').unwrap_or((opt, ""));
        let n: u32 = v
            .parse()
            .map_err(|_| format!("--backend {s}: invalid {k} `{v}`"))?;
        match k {
            "weight" => b.weight = n,
            "max_conns" => b.max_conns = n,
            _ => {
                return Err(format!(
                    "--backend {s}: unknown option `{k}` (expected weight=N or max_conns=N)"
                ))
            }
        }
    }
    Ok(b)
}

/// Load the config from `--config` and/or flags.
fn load(cli: &Cli) -> Result<Config, String> {
    let (mut fc, src, name) = match &cli.config {
        Some(path) => {
            let name = path.display().to_string();
            let src =
                std::fs::read_to_string(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
            let cfg = Config::from_yaml(&src, &name).map_err(|e| e.to_string())?;
            (cfg.file, src, name)
        }
        None => (
            FileConfig::default(),
            String::new(),
            "command line".to_string(),
        ),
    };
    if let Some(l) = &cli.listen {
        fc.server.listen = l.clone();
    }
    if !cli.backends.is_empty() {
        fc.backends = cli
            .backends
            .iter()
            .map(|b| backend_from_arg(b))
            .collect::<Result<_, _>>()?;
    }
    if let Some(a) = &cli.algorithm {
        let alg = Algorithm::from_name(a).ok_or_else(|| {
            format!(
                "--algorithm: unknown algorithm `{a}` (expected one of: {})",
                Algorithm::NAMES.join(", ")
            )
        })?;
        fc.load_balancing.algorithm = AlgorithmName(alg);
    }
    if let Some(w) = cli.workers {
        fc.server.workers = Some(w);
    }
    if let Some(a) = &cli.admin {
        fc.admin.get_or_insert_with(Default::default).listen = a.clone();
    }
    if let Some(size) = &cli.cache {
        let bytes = trireme_core::config::parse_size(size).map_err(|e| format!("--cache: {e}"))?;
        fc.cache.get_or_insert_with(Default::default).size =
            Some(trireme_core::config::Size(bytes));
    }
    if let Some(hp) = &cli.cache_l2 {
        let (host, port) = hp
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
            .filter(|(h, _)| !h.is_empty())
            .ok_or_else(|| format!("--cache-l2: `{hp}` is not HOST:PORT"))?;
        let l2 = fc
            .cache
            .get_or_insert_with(Default::default)
            .l2
            .get_or_insert_with(Default::default);
        l2.enabled = true;
        l2.host = host.to_string();
        l2.port = port;
    }
    if cli.config.is_none() && fc.backends.is_empty() {
        return Err(
            "no backends: pass --config FILE, or --backend URL (repeatable); try `demo`".into(),
        );
    }
    let mut cfg = Config::validate(fc, &src, &name).map_err(|e| e.to_string())?;
    if cli.tls_cert.len() != cli.tls_key.len() {
        return Err(format!(
            "{} --tls-cert but {} --tls-key: give each certificate its key, in the same order",
            cli.tls_cert.len(),
            cli.tls_key.len()
        ));
    }
    cfg.tls_files = cli
        .tls_cert
        .iter()
        .cloned()
        .zip(cli.tls_key.iter().cloned())
        .collect();
    if !cfg.tls_files.is_empty() {
        cfg.tls = Some(tls_from_files(&cfg.tls_files, None)?);
    }
    Ok(cfg)
}

/// `--tls-cert` / `--tls-key`: the listener's certificates and keys, read and checked now,
/// into a new acceptor or (`into`, on SIGHUP) into the one serving; an error names the file
/// and what is wrong with it, and changes nothing.
pub(crate) fn tls_from_files(
    files: &[(PathBuf, PathBuf)],
    into: Option<&trireme_core::tls::TlsAcceptor>,
) -> Result<trireme_core::tls::TlsAcceptor, String> {
    let read = |flag: &str, p: &PathBuf| {
        std::fs::read(p).map_err(|e| format!("{flag} {}: cannot read: {e}", p.display()))
    };
    let mut pems = Vec::with_capacity(files.len());
    for (cert, key) in files {
        pems.push((read("--tls-cert", cert)?, read("--tls-key", key)?));
    }
    let pairs: Vec<(&[u8], &[u8])> = pems.iter().map(|(c, k)| (&c[..], &k[..])).collect();
    use trireme_core::tls::{TlsAcceptor, TlsSetupError};
    let made = match into {
        Some(a) => a.replace(&pairs).map(|()| a.clone()),
        None => TlsAcceptor::from_pems(&pairs),
    };
    made.map_err(|(i, e)| match e {
        TlsSetupError::Cert(why) => format!("--tls-cert {}: {why}", files[i].0.display()),
        TlsSetupError::Key(why) => format!(
            "--tls-key {} (for --tls-cert {}): {why}",
            files[i].1.display(),
            files[i].0.display()
        ),
    })
}

/// Log lines that could not be written (stderr closed or full), for `/metrics`.
pub static LOG_WRITE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// stderr for the log subscriber: a failed write is counted and dropped, never reported
/// (tracing-subscriber's own report is an `eprintln!`, which panics on a closed pipe).
struct LogSink;

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf).map(|()| buf.len())
    }
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if std::io::stderr().lock().write_all(buf).is_err() {
            LOG_WRITE_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `--log`: an invalid filter is an error, not a silent `info`.
fn init_logs(filter: &str) -> Result<(), String> {
    let f = tracing_subscriber::EnvFilter::builder()
        .parse(filter)
        .map_err(|e| {
            format!(
                "--log `{filter}`: invalid log filter: {e} (e.g. info, debug, trireme_core=debug)"
            )
        })?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(|| LogSink)
        .log_internal_errors(false)
        .try_init();
    Ok(())
}

fn run_proxy(
    rt: &Runtime,
    cfg: &Config,
    ctx: Arc<ProxyContext>,
    on_ready: impl FnOnce(SocketAddr),
) -> Result<(), String> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers_guess = cfg.run_options(cores, u64::MAX);
    let pooled: usize = ctx
        .upstreams
        .iter()
        .filter(|u| u.cfg.pool.enabled)
        .map(|u| u.backends.len() * u.cfg.pool.max_idle)
        .sum::<usize>()
        * (rt.pools)(&workers_guess);
    let want = process::fds_needed(workers_guess.max_connections, pooled);
    let fd_limit = process::raise_open_files(want);
    let opts = cfg.run_options(cores, fd_limit.saturating_sub(pooled as u64));
    match cfg.file.server.max_connections {
        Some(max) if want > fd_limit => tracing::warn!(
            limit = fd_limit,
            needed = want,
            max_connections = max,
            "open files limit (ulimit -n) is below what server.max_connections needs; \
             accepts will fail past it (raise `ulimit -n` or lower server.max_connections)"
        ),
        None if want > fd_limit => tracing::info!(
            max_connections = opts.max_connections,
            open_files_limit = fd_limit,
            "server.max_connections not set: limited by the open files limit"
        ),
        _ => {}
    }
    let sd = Arc::new(Shutdown::new());
    // Signals first: a SIGHUP or SIGTERM during start-up is handled like any other.
    let on_hup = cfg.tls.clone().map(|tls| {
        let files = cfg.tls_files.clone();
        Box::new(move || match tls_from_files(&files, Some(&tls)) {
            Ok(_) => tracing::info!(
                certificates = files.len(),
                "SIGHUP: TLS certificates reloaded (new handshakes use them; open connections keep theirs)"
            ),
            Err(e) => tracing::error!("SIGHUP: {e}; the certificates in use stay"),
        }) as Box<dyn Fn() + Send>
    });
    process::spawn_signal_thread(sd.clone(), on_hup).map_err(|e| format!("signal handler: {e}"))?;
    // Bound before the proxy's port: once that accepts, every listener is up.
    let admin = match &cfg.file.admin {
        Some(a) => {
            let want: SocketAddr = a
                .listen
                .parse()
                .map_err(|_| format!("admin.listen: `{}` is not an address (IP:PORT)", a.listen))?;
            let l = crate::admin::bind(want, a, &ctx)
                .map_err(|e| format!("cannot listen on {want} (admin): {e}"))?;
            let bound = l.listener.local_addr().map_err(|e| e.to_string())?;
            tracing::info!(admin = %bound, "admin listening: GET /metrics, POST /cache/purge?url=|prefix=");
            Some(l)
        }
        None => None,
    };
    let listeners =
        process::bind_retrying(|| process::bind_listeners(cfg.listen, (rt.listeners)(&opts)))
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
    let addr = listeners[0].local_addr().map_err(|e| e.to_string())?;
    tracing::info!(
        runtime = rt.name,
        listen = %addr,
        workers = opts.workers,
        tls = cfg.tls.is_some(),
        upstreams = ctx.upstreams.len(),
        "trireme {} ({}) listening",
        env!("CARGO_PKG_VERSION"),
        env!("TRIREME_COMMIT")
    );
    for u in &ctx.upstreams {
        let list: Vec<String> = u
            .backends
            .iter()
            .map(|b| format!("{} (weight {})", b.addr, b.weight))
            .collect();
        tracing::info!(upstream = %u.cfg.name, algorithm = u.cfg.algorithm.name(), backends = %list.join(", "), "upstream");
    }
    // Active health checks run on the runtime's first worker (core's `upstream::Health`).
    if let Some(l2) = ctx.cache.as_ref().and_then(|c| c.l2.as_ref()) {
        // The L2 writer and subscriber run on the runtime's first worker (core's
        // `background::Background`); what this instance publishes carries its name.
        l2.set_instance(instance_id());
        tracing::info!(redis = %l2.addr, ttl = ?l2.ttl, timeout = ?l2.timeout, "cache L2 on");
    }
    // Scheduled and predictive warming come due on the runtime's first worker.
    crate::refresh::warm(&ctx, cfg);
    on_ready(addr);
    let listeners = crate::runtimes::Listeners {
        proxy: listeners,
        admin,
    };
    let res = (rt.run)(ctx, opts, listeners, sd.clone()).map_err(|e| e.to_string());
    sd.request(); // stop the health threads
    res
}

pub fn main(rt: &Runtime) -> i32 {
    // `--version` names the event model and the commit, not only the crate version.
    let version = format!(
        "{} (runtime {}, commit {})",
        env!("CARGO_PKG_VERSION"),
        rt.name,
        env!("TRIREME_COMMIT")
    );
    let matches = <Cli as clap::CommandFactory>::command()
        .version(&*String::leak(version))
        .get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let Err(e) = init_logs(&cli.log) {
        complain!("{e}");
        return 2;
    }
    match &cli.cmd {
        Some(Cmd::Check { config }) => {
            let name = config.display().to_string();
            let res = std::fs::read_to_string(config)
                .map_err(|e| format!("{name}: cannot read: {e}"))
                .and_then(|src| Config::from_yaml(&src, &name).map_err(|e| e.to_string()))
                .and_then(|cfg| {
                    cfg.build(Instant::now(), std::time::SystemTime::now(), &resolve)
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                });
            match res {
                Ok(()) => {
                    say!("{name}: ok");
                    0
                }
                Err(e) => {
                    complain!("{e}");
                    1
                }
            }
        }
        Some(Cmd::Demo {
            listen,
            backends,
            algorithm,
        }) => match crate::demo::run(rt, listen, *backends, algorithm) {
            Ok(()) => 0,
            Err(e) => {
                complain!("error: {e}");
                1
            }
        },
        None => {
            let cfg = match load(&cli) {
                Ok(c) => c,
                Err(e) => {
                    complain!("{e}");
                    return 2;
                }
            };
            let ctx = match cfg.build(Instant::now(), std::time::SystemTime::now(), &resolve) {
                Ok(c) => c,
                Err(e) => {
                    complain!("{e}");
                    return 2;
                }
            };
            match run_proxy(rt, &cfg, ctx, |_| {}) {
                Ok(()) => 0,
                Err(e) => {
                    complain!("error: {e}");
                    1
                }
            }
        }
    }
}

/// Used by `demo`: run the proxy over backends started in-process.
pub(crate) fn run_demo_proxy(
    rt: &Runtime,
    listen: &str,
    backends: &[SocketAddr],
    algorithm: &str,
) -> Result<(), String> {
    let mut fc = FileConfig::default();
    fc.server.listen = listen.to_string();
    fc.server.shutdown_timeout = trireme_core::config::Dur(Duration::from_secs(5));
    fc.backends = backends
        .iter()
        .map(|a| BackendSection {
            url: BackendUrl {
                host: a.ip().to_string(),
                port: a.port(),
            },
            weight: 1,
            max_conns: 0,
        })
        .collect();
    let alg = Algorithm::from_name(algorithm)
        .ok_or_else(|| format!("unknown algorithm `{algorithm}`"))?;
    fc.load_balancing.algorithm = AlgorithmName(alg);
    let cfg = Config::validate(fc, "", "demo").map_err(|e| e.to_string())?;
    let ctx = cfg
        .build(Instant::now(), std::time::SystemTime::now(), &resolve)
        .map_err(|e| e.to_string())?;
    run_proxy(rt, &cfg, ctx, |addr| {
        say!();
        say!(
            "trireme demo ({} runtime): proxy on http://{addr}/ in front of {} demo backends",
            rt.name,
            backends.len()
        );
        say!("  try:  curl -i http://{addr}/hello");
        say!("        for i in 1 2 3 4 5 6; do curl -s http://{addr}/; done");
        say!("  stop: Ctrl-C");
        say!();
    })
}

/// Distinct per process (and per start): pid, start time, and the process's random hash
/// keys. Tells this instance's invalidation messages on the L2 channel from the others'.
fn instance_id() -> Vec<u8> {
    use std::hash::{BuildHasher, Hash, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    std::process::id().hash(&mut h);
    std::time::SystemTime::now().hash(&mut h);
    format!("{:016x}", h.finish()).into_bytes()
}
