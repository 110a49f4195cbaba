//! HTTPS backends: SNI and certificate verification against a real TLS server
//! (`openssl s_server`) on 127.0.0.1, with a CA made for the test and trusted
//! through `SSL_CERT_FILE`, as a private CA would be in production.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};

use common::{Framing, Proc, addr_of, request, spawn_sluice, wait_connect};

const BIN: &str = env!("CARGO_BIN_EXE_sluice");

/// Run `openssl` with a whitespace-separated argument string (no argument here
/// contains spaces).
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("openssl is installed (scripts/setup.sh installs it)");
    assert!(
        out.status.success(),
        "openssl {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &format!(
            "req -x509 -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.pem -days 2 \
             -subj /CN={name} -addext basicConstraints=critical,CA:TRUE \
             -addext keyUsage=critical,keyCertSign,cRLSign"
        ),
    );
}

/// Two CAs (`ca`, trusted by the first gateway, and the unrelated `other-ca`),
/// and certificates for `localhost` and `other.invalid` signed by `ca`.
fn make_pki(dir: &Path) {
    make_ca(dir, "ca");
    make_ca(dir, "other-ca");
    for name in ["localhost", "other.invalid"] {
        openssl(
            dir,
            &format!(
                "req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}"
            ),
        );
        std::fs::write(
            dir.join(format!("{name}.ext")),
            format!("subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
        )
        .expect("write");
        openssl(
            dir,
            &format!(
                "x509 -req -in {name}.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
                 -out {name}.pem -days 2 -extfile {name}.ext"
            ),
        );
    }
}

/// `openssl s_server` serving files from `www/`: `other.invalid`'s certificate
/// by default and `localhost`'s only to clients that send SNI `localhost`.
fn start_tls_server(dir: &Path) -> (Proc, u16) {
    let port = common::closed_port();
    std::fs::create_dir_all(dir.join("www/openai")).expect("mkdir");
    std::fs::write(dir.join("www/openai/hello.txt"), "hello over tls").expect("write");
    let args = format!(
        "s_server -quiet -WWW -accept 127.0.0.1:{port} \
         -cert ../other.invalid.pem -key ../other.invalid.key \
         -servername localhost -cert2 ../localhost.pem -key2 ../localhost.key"
    );
    let child = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir.join("www"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn openssl s_server");
    let p = Proc(child);
    wait_connect(SocketAddr::from(([127, 0, 0, 1], port)));
    (p, port)
}

fn start_gateway(dir: &Path, backend_host: &str, port: u16, ca: &str) -> (Proc, SocketAddr) {
    let yaml = format!(
        "server: {{ listen: 127.0.0.1:0, threads: 1 }}\n\
         backends:\n  - name: tls\n    url: https://{backend_host}:{port}\n    timeouts: {{ connect_ms: 3000, read_ms: 5000 }}\n\
         subscriptions:\n  - name: s\n    primary_key: {{file: s.key}}\n\
         apis:\n  - name: api\n    path: /openai\n    backends: [tls]\n"
    );
    let cfg = format!("gw-{backend_host}-{ca}.yaml");
    std::fs::write(dir.join(&cfg), yaml).expect("write");
    std::fs::write(dir.join("s.key"), "tls-test-key").expect("write");
    let ca_path = dir.join(ca);
    let (p, url) = spawn_sluice(
        BIN,
        &["run", "-c", &cfg],
        dir,
        &[("SSL_CERT_FILE", ca_path.as_os_str())],
        "sluice: listening on",
    );
    let addr = addr_of(&url);
    wait_connect(addr);
    (p, addr)
}

fn get_hello(gw: SocketAddr) -> common::Resp {
    request(
        gw,
        "GET",
        "/openai/hello.txt",
        &[("api-key", "tls-test-key")],
        b"",
        Framing::ContentLength,
    )
    .expect("request")
}

#[test]
fn https_backend_with_sni_and_verified_certificate() {
    let dir = tempfile::tempdir().expect("tempdir");
    make_pki(dir.path());
    let (_server, port) = start_tls_server(dir.path());

    // Trusted CA and the name the certificate is for (sent as SNI): served.
    let (_gw, addr) = start_gateway(dir.path(), "localhost", port, "ca.pem");
    let r = get_hello(addr);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "hello over tls");

    // Same server, but a CA we do not trust: the handshake is refused -> 502.
    let (_gw2, addr2) = start_gateway(dir.path(), "localhost", port, "other-ca.pem");
    let r = get_hello(addr2);
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["statusCode"], 502);

    // Trusted CA, but reached by IP: no SNI, so the server presents
    // other.invalid's certificate, which does not match -> 502.
    let (_gw3, addr3) = start_gateway(dir.path(), "127.0.0.1", port, "ca.pem");
    let r = get_hello(addr3);
    assert_eq!(r.status, 502, "{}", r.text());
}
