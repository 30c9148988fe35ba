#!/usr/bin/env python3
"""Memory per idle TLS client connection: trireme (each runtime) against nginx.

    benches/tls_idle.py [CONNECTIONS]      (default 1000)

For each candidate: start it with one worker on 127.0.0.1:18460 (TLS, an ECDSA P-256
certificate made for the run, in front of a plain nginx origin), read its RSS, open
CONNECTIONS TLS connections that each make one keep-alive request and then stay open and
idle, read the RSS again: the difference over CONNECTIONS is the memory one idle TLS
connection holds (kernel socket memory not included: RSS is the process's own). Only
127.0.0.1 is used; every process started is killed by PID.
"""
import os, resource, socket, ssl, subprocess, sys, tempfile, time

N = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
work = tempfile.mkdtemp(prefix="trireme-tls-idle.")
procs = []


def wait_port(port):
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"port {port} never opened")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def start(cmd, **kw):
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    procs.append(p)
    return p


try:
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "2", "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=IP:127.0.0.1", "-keyout", f"{work}/k.pem", "-out", f"{work}/c.pem"],
                   check=True, capture_output=True)
    os.makedirs(f"{work}/origin", exist_ok=True)
    with open(f"{work}/origin/nginx.conf", "w") as f:
        f.write(f"""worker_processes 1; pid {work}/origin/nginx.pid; error_log {work}/origin/err.log error;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_timeout 300s;
  server {{ listen 127.0.0.1:18461; location / {{ return 200 "ok"; }} }} }}
""")
    start(["nginx", "-p", f"{work}/origin", "-c", f"{work}/origin/nginx.conf", "-g", "daemon off;"])
    wait_port(18461)
    with open(f"{work}/nginx.conf", "w") as f:
        f.write(f"""worker_processes 1; pid {work}/nginx.pid; error_log {work}/err.log error;
worker_rlimit_nofile {N * 2 + 100};
events {{ worker_connections {N * 2 + 100}; }}
http {{ access_log off; keepalive_timeout 300s; ssl_session_cache shared:SSL:10m;
  upstream be {{ server 127.0.0.1:18461; keepalive 16; }}
  server {{ listen 127.0.0.1:18460 ssl; ssl_certificate {work}/c.pem; ssl_certificate_key {work}/k.pem;
    location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    cands = {
        "nginx": ["nginx", "-p", work, "-c", f"{work}/nginx.conf", "-g", "daemon off; master_process off;"],
    }
    for rt in ("mio", "monoio", "tokio"):
        cands[f"trireme-{rt}"] = [f"{ROOT}/target/release/trireme-{rt}", "--listen", "127.0.0.1:18460",
                                  "--workers", "1", "--backend", "http://127.0.0.1:18461",
                                  "--tls-cert", f"{work}/c.pem", "--tls-key", f"{work}/k.pem"]
    ctx = ssl.create_default_context(cafile=f"{work}/c.pem")
    ctx.check_hostname = False
    print(f"| candidate | RSS before (KiB) | RSS with {N} idle TLS connections (KiB) | bytes per idle connection |")
    print("|---|---:|---:|---:|")
    for name, cmd in cands.items():
        p = start(cmd)
        wait_port(18460)
        time.sleep(0.3)
        # One connection first: pools, the session cache and lazy set-up are not counted.
        warm = ctx.wrap_socket(socket.create_connection(("127.0.0.1", 18460)))
        warm.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        warm.recv(4096)
        time.sleep(0.2)
        before = rss_kib(p.pid)
        conns = []
        for _ in range(N):
            s = ctx.wrap_socket(socket.create_connection(("127.0.0.1", 18460)))
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            s.recv(4096)
            conns.append(s)
        time.sleep(0.5)
        after = rss_kib(p.pid)
        print(f"| {name} | {before} | {after} | {(after - before) * 1024 // N} |")
        for s in conns:
            s.close()
        warm.close()
        p.kill()
        p.wait()
        procs.remove(p)
        time.sleep(0.3)
finally:
    for p in procs:
        p.kill()
    subprocess.run(["rm", "-rf", work])
