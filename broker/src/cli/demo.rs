//! `broker demo`: the whole flow, offline, in a throwaway `BROKER_HOME`.
//!
//! A local TLS origin plays `api.openai.com` and answers 200 only to the real (demo) key; the
//! key goes into a fresh vault; a real client (curl, else python3) runs as the agent with the
//! placeholder in `OPENAI_API_KEY`, preloaded with `libbroker.so` when it is found; the demo
//! prints what the agent held next to what the origin received, and exits 0 only if the swap
//! really happened and the agent never saw the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::Args;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::home::{write_private_file, Home};
use crate::instance::{self, InstanceSettings, RunSpec};
use crate::launch;
use crate::proxy::{ResolveOverride, UpstreamSettings};
use crate::vault::{CredentialKind, KeyConfig, KeySource, Vault};

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Keep the throwaway BROKER_HOME and print where it is.
    #[arg(long)]
    pub keep: bool,
}

const HOST: &str = "api.openai.com";

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let dir = tempfile::Builder::new().prefix("broker-demo-").tempdir()?;
    let home = Home::at(dir.path().join("home"));
    home.ensure()?;
    let keys = KeyConfig {
        source: Some(KeySource::File),
        passphrase: None,
    };
    let demo_key = demo_key()?;

    let runtime = super::runtime()?;
    let result = runtime.block_on(demo(&home, &keys, &demo_key, dir.path()));
    if args.keep {
        let kept = dir.keep();
        println!(
            "\nkept the demo BROKER_HOME at {}",
            kept.join("home").display()
        );
    }
    result
}

async fn demo(
    home: &Home,
    keys: &KeyConfig,
    demo_key: &str,
    scratch: &Path,
) -> anyhow::Result<ExitCode> {
    println!("broker demo: the whole flow, offline, in a throwaway BROKER_HOME\n");

    // 1. The origin.
    let origin = DemoOrigin::start(scratch, demo_key.to_string()).await?;
    println!(
        "1. a local origin plays https://{HOST} ({}) and accepts only the real key",
        origin.addr
    );

    // 2. The vault.
    let vault = Vault::open_with(home, keys)?;
    vault.put("openai", "default", demo_key, CredentialKind::ApiKey)?;
    drop(vault);
    println!(
        "2. the real key is sealed in the vault: {}…  (made up for this demo)",
        &demo_key[..12]
    );

    // 3. The broker.
    let started = instance::start(InstanceSettings {
        home: home.clone(),
        upstream: UpstreamSettings {
            extra_ca: Some(origin.ca_file.clone()),
            resolve: vec![ResolveOverride {
                host: HOST.into(),
                port: 443,
                addr: origin.addr,
            }],
        },
        label: "demo".into(),
        keys: keys.clone(),
        runtime_dir: home.daemon_dir(),
        run: RunSpec {
            id: "demo".into(),
            command: "broker demo".into(),
            ..RunSpec::default()
        },
    })
    .await?;
    let placeholder = started
        .shim
        .env
        .iter()
        .find(|(var, _)| var == "OPENAI_API_KEY")
        .map(|(_, p)| p.clone())
        .context("the catalog has no OPENAI_API_KEY placeholder")?;
    println!(
        "3. the broker listens on 127.77.1.x:{} with a CA limited to managed hosts",
        started.shim.port
    );

    // 4. The agent.
    let agent = AgentCommand::pick(&started.shim, &started.shim_config_path)?;
    println!("4. the agent runs with OPENAI_API_KEY={placeholder}");
    println!("   $ {}", agent.describe);
    let cmd = agent.command;
    let output = tokio::task::spawn_blocking(move || run_agent(cmd)).await??;
    let agent_out = String::from_utf8_lossy(&output.stdout).into_owned();
    let agent_err = String::from_utf8_lossy(&output.stderr).into_owned();

    let received = origin
        .received
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let origin_auth = received
        .first()
        .cloned()
        .unwrap_or_else(|| "(nothing arrived)".into());
    let held = format!("OPENAI_API_KEY={placeholder}");
    let width = held.len().max(20);
    println!();
    println!(
        "   {:<width$}   {}",
        "what the agent held", "what the origin received"
    );
    println!(
        "   {:<width$}   {}",
        held,
        format!("Authorization: {origin_auth}")
    );
    println!();
    println!(
        "   the agent got: {}",
        agent_out.lines().next().unwrap_or("(no output)")
    );

    let swapped = origin_auth == format!("Bearer {demo_key}");
    let agent_clean = !agent_out.contains(demo_key) && !agent_err.contains(demo_key);
    if swapped && agent_clean && output.status.success() {
        println!("\nok: the origin got the real key; the agent only ever held the placeholder.");
        if !agent.transparent {
            println!("(libbroker.so was not found next to the broker binary, so the agent was pointed at the broker explicitly; build the workspace to see the transparent path)");
        }
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("\nbroker demo: FAILED: the swap did not happen as it should");
        if !agent_err.trim().is_empty() {
            eprintln!("agent stderr: {}", agent_err.trim());
        }
        Ok(ExitCode::FAILURE)
    }
}

/// A random, made-up key in OpenAI's format.
fn demo_key() -> anyhow::Result<String> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness"))?;
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("sk-demo-{hex}"))
}

/// The client that plays the agent.
struct AgentCommand {
    command: Command,
    describe: String,
    /// Whether it runs under the shim (no flags pointing it at the broker).
    transparent: bool,
}

impl AgentCommand {
    fn pick(
        shim: &broker_contract::ShimConfig,
        shim_config: &Path,
    ) -> anyhow::Result<AgentCommand> {
        let url = format!("https://{HOST}/v1/models");
        let placeholder = shim
            .env
            .iter()
            .find(|(v, _)| v == "OPENAI_API_KEY")
            .map(|(_, p)| p.clone())
            .unwrap_or_default();
        let lib = launch::find_shim();
        let curl = launch::which("curl");
        let python = launch::which("python3");
        let script = format!(
            "import os,urllib.request as u\nr=u.Request('{url}',headers={{'Authorization':'Bearer '+os.environ['OPENAI_API_KEY']}})\nprint(u.urlopen(r).read().decode())"
        );
        let (mut command, describe, transparent) = match (&lib, &curl, &python) {
            (Some(_), Some(curl), _) => {
                let mut c = Command::new(curl);
                c.args(["-sS", "--fail-with-body", &url, "-H"]).arg(format!("Authorization: Bearer {placeholder}"));
                (c, format!("curl -sS {url} -H \"Authorization: Bearer $OPENAI_API_KEY\"   # LD_PRELOAD=libbroker.so"), true)
            }
            (Some(_), None, Some(python)) => {
                let mut c = Command::new(python);
                c.arg("-c").arg(&script);
                (c, "python3 -c 'urllib.request.urlopen(...)'   # LD_PRELOAD=libbroker.so".to_string(), true)
            }
            (None, Some(curl), _) => {
                let target = format!("{HOST}:443:{}:{}", broker_contract::fake_ipv4(shim.slot, shim.host_index(HOST).unwrap_or(1)), shim.port);
                let mut c = Command::new(curl);
                c.args(["-sS", "--fail-with-body", "--connect-to", &target, "--cacert"])
                    .arg(&shim.ca_file)
                    .args([&url, "-H"])
                    .arg(format!("Authorization: Bearer {placeholder}"));
                (c, format!("curl -sS --connect-to {target} --cacert ca.pem {url} -H \"Authorization: Bearer $OPENAI_API_KEY\""), false)
            }
            _ => bail!("broker demo needs curl or python3 to play the agent; install one (apt-get install curl)"),
        };
        command.env("OPENAI_API_KEY", &placeholder);
        launch::scrub_broker_secrets(&mut command);
        if let Some(lib) = &lib {
            launch::preload(&mut command, lib, shim_config);
        }
        Ok(AgentCommand {
            command,
            describe,
            transparent,
        })
    }
}

fn run_agent(mut command: Command) -> anyhow::Result<std::process::Output> {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot start the agent")?;
    Ok(child.wait_with_output()?)
}

/// The stand-in for api.openai.com: its own CA, a TLS listener on 127.0.0.1:0.
struct DemoOrigin {
    addr: SocketAddr,
    ca_file: PathBuf,
    received: Arc<Mutex<Vec<String>>>,
}

impl DemoOrigin {
    async fn start(scratch: &Path, key: String) -> anyhow::Result<DemoOrigin> {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "broker demo origin CA");
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
        Ok(DemoOrigin {
            addr,
            ca_file,
            received,
        })
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
    let (status, body) = if ok {
        (
            200,
            r#"{"object":"list","data":[{"id":"demo-model","object":"model"}]}"#,
        )
    } else {
        (401, r#"{"error":{"message":"Incorrect API key provided"}}"#)
    };
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::UNAUTHORIZED);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}
