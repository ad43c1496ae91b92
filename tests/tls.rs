//! TLS on every connection: links carried over verify-full against a CA the test makes,
//! and wrong certificates, wrong host names and servers without TLS refused with a
//! message that names what is wrong (docs/security.md).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use support::*;

/// A CA, a second CA that signed nothing here, and a server certificate for `localhost`
/// only (not for 127.0.0.1), signed by the first.
struct Certificates {
    ca: PathBuf,
    wrong_ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn make_certificates(dir: &Path) -> Certificates {
    let dir = dir.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    for ca in ["ca", "wrong-ca"] {
        openssl(
            &dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.crt"),
                "-days",
                "2",
                "-subj",
                &format!("/CN=walsync test {ca}"),
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    // The server reads its key as user postgres and wants it private.
    let key = dir.join("server.key");
    Command::new("chown")
        .args(["postgres:postgres"])
        .arg(&key)
        .status()
        .unwrap();
    Command::new("chmod").arg("600").arg(&key).status().unwrap();
    Certificates {
        ca: dir.join("ca.crt"),
        wrong_ca: dir.join("wrong-ca.crt"),
        server_cert: dir.join("server.crt"),
        server_key: key,
    }
}

fn enable_ssl(node: &Node, certs: &Certificates) {
    node.sql(&format!(
        "ALTER SYSTEM SET ssl_cert_file = '{}'",
        certs.server_cert.display()
    ));
    node.sql(&format!(
        "ALTER SYSTEM SET ssl_key_file = '{}'",
        certs.server_key.display()
    ));
    node.sql("ALTER SYSTEM SET ssl = on");
    node.sql("SELECT pg_reload_conf()");
    wait_for(
        &format!("ssl on {}", node.name),
        DEADLINE,
        || node.sql("SHOW ssl") == "on",
        || node.pg.log_tail(20),
    );
}

/// `config` with every dsn's host and TLS parameters replaced.
fn with_tls(config: &Path, host: &str, params: &str, out: &Path) {
    let text = std::fs::read_to_string(config).unwrap();
    let text: String = text
        .lines()
        .map(|l| match l.strip_prefix("dsn = \"") {
            Some(dsn) => format!(
                "dsn = \"{} {params}\"",
                dsn.trim_end_matches('"')
                    .replace("host=127.0.0.1", &format!("host={host}"))
            ),
            None => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(out, text).unwrap();
}

#[test]
fn links_run_over_verified_tls_and_bad_certificates_are_refused_by_name() {
    let mut c = TestCluster::new("tls", Topology::Mesh, &["a", "b"], RETAIL_SCHEMA);
    let certs = make_certificates(&c.dir);
    let plain_a = c.node("a").config.clone();

    // A server without TLS, and a dsn that requires it: refused, saying so.
    let require = c.dir.join("a-require.toml");
    with_tls(&plain_a, "127.0.0.1", "sslmode=require", &require);
    let (ok, out) = walsync(&["status", "--config", require.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("does not offer TLS") && out.contains("sslmode=require"),
        "{out}"
    );

    for n in &c.nodes {
        enable_ssl(n, &certs);
    }
    let verify = format!("sslmode=verify-full sslrootcert={}", certs.ca.display());

    // A CA that did not sign the server's certificate: refused, naming the file.
    let wrong_ca = c.dir.join("a-wrong-ca.toml");
    with_tls(
        &plain_a,
        "localhost",
        &format!(
            "sslmode=verify-full sslrootcert={}",
            certs.wrong_ca.display()
        ),
        &wrong_ca,
    );
    let (ok, out) = walsync(&["status", "--config", wrong_ca.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("not signed by a CA in sslrootcert")
            && out.contains(&certs.wrong_ca.display().to_string()),
        "{out}"
    );

    // The right CA but a host name the certificate does not carry.
    let wrong_host = c.dir.join("a-wrong-host.toml");
    with_tls(&plain_a, "127.0.0.1", &verify, &wrong_host);
    let (ok, out) = walsync(&["status", "--config", wrong_host.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("does not name host 127.0.0.1"), "{out}");

    // verify-full with the right CA and name: every link, stream and apply, over TLS.
    for i in 0..c.nodes.len() {
        let config = c.nodes[i].config.clone();
        let tls = c.dir.join(format!("{}-tls.toml", c.nodes[i].name));
        with_tls(&config, "localhost", &verify, &tls);
        c.nodes[i].config = tls;
    }
    c.start();
    c.node("a")
        .sql("INSERT INTO partner (name) VALUES ('sold at a')");
    c.node("b")
        .sql("INSERT INTO partner (name) VALUES ('sold at b')");
    c.wait_rows("a", "partner", 2);
    c.wait_rows("b", "partner", 2);
    c.wait_converged("partner");
    for n in &c.nodes {
        // Every walsync session on the server: the peer's stream (walsender) and the
        // local and remote SQL sessions.
        let (plain, tls_walsenders) = {
            let row = n.sql(
                "SELECT count(*) FILTER (WHERE NOT t.ssl), \
                        count(*) FILTER (WHERE t.ssl AND a.backend_type = 'walsender') \
                 FROM pg_stat_activity a JOIN pg_stat_ssl t USING (pid) \
                 WHERE a.application_name LIKE 'walsync%'",
            );
            let (p, w) = row.split_once('|').unwrap();
            (p.to_string(), w.to_string())
        };
        assert_eq!(plain, "0", "{}: a walsync session without TLS", n.name);
        assert_eq!(
            tls_walsenders, "1",
            "{}: the peer's stream over TLS",
            n.name
        );
        // `walsync status` says so per link and per slot.
        let (ok, out) = n.walsync(&["status", "--json"]);
        assert!(ok, "{out}");
        let report: serde_json::Value = serde_json::from_str(&out).expect("status --json");
        assert_eq!(report["links_in"][0]["apply_tls"], true, "{out}");
        assert_eq!(report["slots"][0]["stream_tls"], true, "{out}");
    }
}
