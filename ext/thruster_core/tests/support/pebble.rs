//! Debian's `pebble` ACME test server (with `pebble-challtestsrv` as its
//! DNS) on loopback, and a real Puma, for the ACME tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use thruster_core::Server;

use super::*;

/// Pebble's EAB key for `kid-1` in the Debian example configuration.
pub const EAB_KID: &str = "kid-1";
/// How long an issuance may take before a test fails.
pub const ISSUANCE: Duration = Duration::from_secs(60);

pub const EAB_KEY: &str = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W";

/// A certificate and key (PEM) for Pebble's API: localhost and 127.0.0.1.
pub fn api_certificate() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

pub fn pebble_installed() -> bool {
    let found =
        Path::new("/usr/bin/pebble").exists() && Path::new("/usr/bin/pebble-challtestsrv").exists();
    if !found {
        println!("SKIPPED: pebble is not installed (apt-get install pebble; bin/setup does)");
    }
    found
}

/// A running Pebble + challenge test server pair, killed on drop.
pub struct Pebble {
    children: Vec<Child>,
    dir: TempDir,
    api: u16,
    mgmt: u16,
}

#[derive(Default)]
pub struct PebbleOptions {
    pub eab: bool,
    pub validity_seconds: Option<u64>,
    /// The directory's port (default: any free one).
    pub api_port: Option<u16>,
    /// The directory's certificate and key (PEM); default: made here.
    pub api_cert: Option<(String, String)>,
}

impl Pebble {
    /// Starts Pebble validating against the proxy's `http_port`/`tls_port`.
    pub fn start(http_port: u16, tls_port: u16, options: PebbleOptions) -> Pebble {
        let dir = TempDir::new("pebble");
        // Pebble's own API certificate: localhost and 127.0.0.1.
        let (cert, key) = options.api_cert.clone().unwrap_or_else(api_certificate);
        std::fs::write(dir.path().join("api-cert.pem"), cert).unwrap();
        std::fs::write(dir.path().join("api-key.pem"), key).unwrap();

        let api = options.api_port.unwrap_or_else(free_port);
        let (mgmt, dns, chall_mgmt) = (free_port(), free_port(), free_port());
        let mut pebble = serde_json::json!({
            "listenAddress": format!("127.0.0.1:{api}"),
            "managementListenAddress": format!("127.0.0.1:{mgmt}"),
            "certificate": dir.path().join("api-cert.pem"),
            "privateKey": dir.path().join("api-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": options.eab,
        });
        if options.eab {
            pebble["externalAccountMACKeys"] = serde_json::json!({ EAB_KID: EAB_KEY });
        }
        if let Some(seconds) = options.validity_seconds {
            pebble["certificateValidityPeriod"] = seconds.into();
        }
        let config = dir.path().join("pebble.json");
        std::fs::write(&config, serde_json::json!({ "pebble": pebble }).to_string()).unwrap();

        let log = |name: &str| std::fs::File::create(dir.path().join(name)).unwrap();
        let challtestsrv = Command::new("pebble-challtestsrv")
            .args(["-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""])
            .arg("-dns01")
            .arg(format!("127.0.0.1:{dns}"))
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .arg("-management")
            .arg(format!("127.0.0.1:{chall_mgmt}"))
            .stdout(log("challtestsrv.log"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Command::new("pebble")
            .arg("-config")
            .arg(&config)
            .arg("-dnsserver")
            .arg(format!("127.0.0.1:{dns}"))
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0")
            .stdout(log("pebble.log"))
            .stderr(log("pebble.err"))
            .spawn()
            .unwrap();
        let pebble = Pebble {
            children: vec![challtestsrv, server],
            dir,
            api,
            mgmt,
        };
        // Readiness: the directory answers over TLS.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = run(Command::new("curl")
                .args(["-sf", "--max-time", "2", "--cacert"])
                .arg(pebble.api_ca())
                .arg(pebble.directory()));
            if out.status.success() {
                return pebble;
            }
            let read = |name: &str| {
                std::fs::read_to_string(pebble.dir.path().join(name)).unwrap_or_default()
            };
            assert!(
                Instant::now() < deadline,
                "Pebble not ready after 30 s:\n{}\n{}\n{}",
                read("pebble.log"),
                read("pebble.err"),
                read("challtestsrv.log")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn directory(&self) -> String {
        format!("https://127.0.0.1:{}/dir", self.api)
    }

    pub fn api_ca(&self) -> PathBuf {
        self.dir.path().join("api-cert.pem")
    }

    /// Pebble's issuing root (random per start), written for clients.
    pub fn root(&self) -> PathBuf {
        let path = self.dir.path().join("root.pem");
        let out = run(Command::new("curl")
            .args(["-sf", "--max-time", "5", "--cacert"])
            .arg(self.api_ca())
            .arg(format!("https://127.0.0.1:{}/roots/0", self.mgmt)));
        assert!(out.status.success(), "could not fetch Pebble's root");
        std::fs::write(&path, out.stdout).unwrap();
        path
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pebble.log")).unwrap_or_default()
    }
}

impl Drop for Pebble {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A real Puma serving the spec fixture app, or None without Puma.
pub struct Puma(Child, pub SocketAddr);

impl Puma {
    pub fn start() -> Option<Puma> {
        if !have("puma") {
            println!("NOTE: puma not installed; using an echo upstream instead");
            return None;
        }
        let port = free_port();
        let app = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/fixtures/app.ru");
        let child = Command::new("puma")
            .arg("-b")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .args(["-t", "1:4", "--quiet"])
            .arg(app)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for(Duration::from_secs(20), "Puma", || {
            std::net::TcpStream::connect(addr).ok().map(|_| ())
        });
        Some(Puma(child, addr))
    }
}

impl Drop for Puma {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A proxy in ACME mode on the ports Pebble validates against.
pub fn acme_proxy(
    pebble: &Pebble,
    storage: &Path,
    upstream: SocketAddr,
    (http, https): (u16, u16),
    extra: &[(&str, &str)],
) -> Server {
    let directory = pebble.directory();
    let ca = pebble.api_ca();
    let mut pairs = vec![
        ("ACME_DIRECTORY", directory.as_str()),
        ("ACME_CA_FILE", ca.to_str().unwrap()),
        ("STORAGE_PATH", storage.to_str().unwrap()),
        ("HTTP_READ_TIMEOUT", "10"),
    ];
    pairs.extend_from_slice(extra);
    start_server(config(&pairs), upstream, http, https)
}

/// What an issuance test starts with: Pebble, an echo app, and a proxy in
/// ACME mode for it with its own storage. Fields drop in order: the proxy
/// stops before Pebble.
pub struct AcmeRig {
    pub server: Server,
    pub pebble: Pebble,
    pub storage: TempDir,
    pub ports: (u16, u16),
    pub rt: tokio::runtime::Runtime,
}

/// Starts an [`AcmeRig`]; `extra` settings go to the proxy (TLS_DOMAIN, ...).
pub fn acme_rig(tag: &str, options: PebbleOptions, extra: &[(&str, &str)]) -> AcmeRig {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ports = (free_port(), free_port());
    let pebble = Pebble::start(ports.0, ports.1, options);
    let upstream = start_echo_upstream(&rt);
    let storage = TempDir::new(tag);
    let server = acme_proxy(&pebble, storage.path(), upstream, ports, extra);
    AcmeRig {
        server,
        pebble,
        storage,
        ports,
        rt,
    }
}

pub fn wait_for_certificate(storage: &Path, domain: &str, pebble: &Pebble) {
    let path = storage.join(format!("{domain}.crt.pem"));
    let started = Instant::now();
    let deadline = started + ISSUANCE;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "no certificate for {domain} after {ISSUANCE:?}; Pebble log:\n{}",
            pebble.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    println!("{domain}: issued in {:?}", started.elapsed());
}
