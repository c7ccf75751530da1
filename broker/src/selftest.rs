//! An offline, end-to-end check of the whole flow, used by `broker demo` and `broker doctor`:
//! a local TLS origin playing `api.openai.com` that accepts only a made-up key, a throwaway
//! vault holding that key, a broker instance pointed at the origin, and real clients (curl,
//! python3, node, wget) run as the agent under `libbroker.so` with the placeholder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::home::{write_private_file, Home};
use crate::instance::{self, Instance, InstanceSettings, RunSpec};
use crate::launch;
use crate::proxy::{ResolveOverride, UpstreamSettings};
use crate::vault::{CredentialKind, KeyConfig, KeySource, Vault};

/// The host the origin plays.
pub const HOST: &str = "api.openai.com";
const URL: &str = "https://api.openai.com/v1/models";
/// The repository the git probe lists; the origin answers its `info/refs` with [`GIT_REF`].
const GIT_URL: &str = "https://api.openai.com/broker-self-test.git";
const GIT_REF: &str = "8c7a1e0f4b3d2c1a0f9e8d7c6b5a493827161504\trefs/heads/main\n";
/// A client that hangs is a failed check, not a hung command.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// A running self-test: origin, vault and broker, in a throwaway home under `scratch`.
pub struct SelfTest {
    pub origin: Origin,
    pub instance: Instance,
    pub home: Home,
    /// The made-up key the origin accepts.
    pub key: String,
    /// What the agent holds in `OPENAI_API_KEY`.
    pub placeholder: String,
}

impl SelfTest {
    pub async fn start(scratch: &Path, label: &str) -> anyhow::Result<SelfTest> {
        let home = Home::at(scratch.join("home"));
        home.ensure()?;
        let keys = KeyConfig {
            source: Some(KeySource::File),
            passphrase: None,
        };
        let key = made_up_key()?;
        let origin = Origin::start(scratch, key.clone()).await?;
        let vault = Vault::open_with(&home, &keys)?;
        vault.put("openai", "default", &key, CredentialKind::ApiKey)?;
        drop(vault);
        let instance = instance::start(InstanceSettings {
            home: home.clone(),
            upstream: UpstreamSettings {
                extra_ca: Some(origin.ca_file.clone()),
                resolve: vec![ResolveOverride {
                    host: HOST.into(),
                    port: 443,
                    addr: origin.addr,
                }],
                dns: Vec::new(),
            },
            label: label.into(),
            limits: crate::proxy::Limits::default(),
            keys,
            runtime_dir: home.daemon_dir(),
            run: RunSpec {
                id: label.into(),
                command: format!("broker {label}"),
                ..RunSpec::default()
            },
        })
        .await?;
        let placeholder = instance
            .shim
            .env
            .iter()
            .find(|(var, _)| var == "OPENAI_API_KEY")
            .map(|(_, p)| p.clone())
            .context("the catalog has no OPENAI_API_KEY placeholder")?;
        Ok(SelfTest {
            origin,
            instance,
            home,
            key,
            placeholder,
        })
    }

    /// The probes this machine can run: each installed client, under the shim when it is
    /// found, else (curl only) pointed at the broker explicitly.
    pub fn probes(&self) -> Vec<Probe> {
        let shim = launch::find_shim();
        let bearer = format!("Authorization: Bearer {}", self.placeholder);
        let mut probes = Vec::new();
        if let Some(curl) = launch::which("curl") {
            let mut c = Command::new(curl);
            if shim.is_some() {
                c.args(["-sS", "--fail-with-body", URL, "-H", &bearer]);
                probes.push(self.probe("curl", c, "curl -sS https://api.openai.com/v1/models -H \"Authorization: Bearer $OPENAI_API_KEY\"", &shim));
            } else {
                let shim_cfg = &self.instance.shim;
                let index = shim_cfg.host_index(HOST).unwrap_or(1);
                let target = format!(
                    "{HOST}:443:{}:{}",
                    broker_contract::fake_ipv4(shim_cfg.slot, index),
                    shim_cfg.port
                );
                c.args([
                    "-sS",
                    "--fail-with-body",
                    "--connect-to",
                    &target,
                    "--cacert",
                ])
                .arg(&shim_cfg.ca_file)
                .args([URL, "-H", &bearer]);
                probes.push(self.probe("curl", c, &format!("curl -sS --connect-to {target} --cacert ca.pem {URL} -H \"Authorization: Bearer $OPENAI_API_KEY\""), &None));
            }
        }
        if shim.is_none() {
            return probes;
        }
        if let Some(python) = launch::which("python3") {
            let mut c = Command::new(python);
            c.arg("-c").arg(format!(
                "import os,urllib.request as u\nr=u.Request('{URL}',headers={{'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']}})\nprint(u.urlopen(r).read().decode())"
            ));
            probes.push(self.probe(
                "python3",
                c,
                "python3 -c 'urllib.request.urlopen(...)'",
                &shim,
            ));
        }
        if let Some(node) = launch::which("node") {
            let mut c = Command::new(node);
            c.arg("-e").arg(format!(
                "fetch('{URL}',{{headers:{{authorization:'Bearer '+process.env.OPENAI_API_KEY}}}}).then(async r=>{{console.log(await r.text());process.exit(r.ok?0:1)}}).catch(e=>{{console.error(String(e));process.exit(2)}})"
            ));
            probes.push(self.probe("node", c, "node -e 'fetch(...)'", &shim));
        }
        if let Some(git) = launch::which("git") {
            // git over HTTPS as it talks to a forge: the placeholder in an extra header, and
            // the origin's `info/refs` answered in git's dumb-HTTP form (a ref list).
            let mut c = Command::new(git);
            c.args([
                "-c",
                &format!("http.extraHeader={bearer}"),
                "ls-remote",
                GIT_URL,
            ])
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("GIT_CONFIG_GLOBAL", "/dev/null");
            probes.push(self.probe(
                "git",
                c,
                &format!("git -c http.extraHeader=\"Authorization: Bearer $OPENAI_API_KEY\" ls-remote {GIT_URL}"),
                &shim,
            ));
        }
        if let Some(wget) = launch::which("wget") {
            let mut c = Command::new(wget);
            c.args(["-q", "-O", "-", "--header", &bearer, URL]);
            probes.push(self.probe(
                "wget",
                c,
                "wget -q -O - --header \"Authorization: Bearer $OPENAI_API_KEY\" ...",
                &shim,
            ));
        }
        probes
    }

    fn probe(
        &self,
        name: &'static str,
        mut command: Command,
        shown: &str,
        shim: &Option<PathBuf>,
    ) -> Probe {
        command.env("OPENAI_API_KEY", &self.placeholder);
        launch::scrub_broker_secrets(&mut command);
        if let Some(lib) = shim {
            launch::preload(&mut command, lib, &self.instance.shim_config_path);
        }
        Probe {
            name,
            command,
            shown: shown.to_string(),
            transparent: shim.is_some(),
        }
    }

    /// Run one probe (blocking) and check both halves of the promise.
    pub fn check(&self, probe: Probe) -> ProbeResult {
        let before = self.origin.received().len();
        let output = run_bounded(probe.command);
        let received = self.origin.received();
        let origin_auth = received.get(before).cloned();
        let (ok, stdout, detail) = match output {
            Ok(out) => {
                let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
                let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
                let leaked = stdout.contains(&self.key) || stderr.contains(&self.key);
                let swapped =
                    origin_auth.as_deref() == Some(format!("Bearer {}", self.key).as_str());
                let detail = if leaked {
                    "the agent saw the real key".to_string()
                } else if origin_auth.is_none() {
                    format!(
                        "nothing reached the origin: {}",
                        first_line(&stderr, &stdout)
                    )
                } else if !swapped {
                    "the origin did not get the real key".to_string()
                } else if !out.status.success() {
                    format!("the client failed: {}", first_line(&stderr, &stdout))
                } else if probe.transparent {
                    "swap verified through libbroker.so".to_string()
                } else {
                    "swap verified (client pointed at the broker; libbroker.so not found)"
                        .to_string()
                };
                (swapped && !leaked && out.status.success(), stdout, detail)
            }
            Err(err) => (false, String::new(), err.to_string()),
        };
        ProbeResult {
            name: probe.name,
            ok,
            detail,
            origin_auth,
            stdout,
        }
    }
}

/// One client to run as the agent.
pub struct Probe {
    pub name: &'static str,
    command: Command,
    /// How the command reads to a person (with `$OPENAI_API_KEY` unexpanded).
    pub shown: String,
    /// Under libbroker.so (true) or pointed at the broker explicitly.
    pub transparent: bool,
}

pub struct ProbeResult {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
    /// The `Authorization` the origin received, if anything arrived.
    pub origin_auth: Option<String>,
    pub stdout: String,
}

fn first_line<'a>(a: &'a str, b: &'a str) -> &'a str {
    a.lines()
        .chain(b.lines())
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no output)")
}

fn run_bounded(mut command: Command) -> anyhow::Result<std::process::Output> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the client")?;
    let deadline = std::time::Instant::now() + PROBE_TIMEOUT;
    while child.try_wait()?.is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            anyhow::bail!("timed out after {}s", PROBE_TIMEOUT.as_secs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(child.wait_with_output()?)
}

/// A random, made-up key in OpenAI's format.
fn made_up_key() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sk-demo-{hex}"))
}

/// The stand-in for api.openai.com: its own CA, a TLS listener on 127.0.0.1:0.
pub struct Origin {
    pub addr: SocketAddr,
    pub ca_file: PathBuf,
    received: Arc<Mutex<Vec<String>>>,
}

impl Origin {
    async fn start(scratch: &Path, key: String) -> anyhow::Result<Origin> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "broker self-test origin CA");
        let ca = ca_params.self_signed(&ca_key)?;
        let leaf_key = KeyPair::generate()?;
        let leaf =
            CertificateParams::new(vec![HOST.to_string()])?.signed_by(&leaf_key, &ca, &ca_key)?;
        let ca_file = scratch.join("origin-ca.pem");
        write_private_file(&ca_file, ca.pem().as_bytes())?;

        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        let key = Arc::new(key);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, seen, key) = (acceptor.clone(), seen.clone(), key.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req| answer(req, seen.clone(), key.clone()));
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Ok(Origin {
            addr,
            ca_file,
            received,
        })
    }

    /// The `Authorization` header of every request so far.
    pub fn received(&self) -> Vec<String> {
        self.received
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<String>>>,
    key: Arc<String>,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ok = auth == format!("Bearer {key}");
    seen.lock().unwrap_or_else(|p| p.into_inner()).push(auth);
    let git = req.uri().path().ends_with(".git/info/refs");
    let (status, body) = if ok && git {
        (http::StatusCode::OK, GIT_REF)
    } else if ok {
        (
            http::StatusCode::OK,
            r#"{"object":"list","data":[{"id":"demo-model","object":"model"}]}"#,
        )
    } else {
        (
            http::StatusCode::UNAUTHORIZED,
            r#"{"error":{"message":"Incorrect API key provided"}}"#,
        )
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static(match git {
            true => "text/plain",
            false => "application/json",
        }),
    );
    Ok(response)
}
