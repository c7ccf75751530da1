//! AWS SigV4 re-signing (issue 22) against a real AWS implementation run locally: moto in
//! server mode with IAM authentication on, behind TLS from the test CA, reached by the broker
//! through `--resolve` and `--upstream-ca`. The agents are boto3 and the `aws` CLI under
//! `broker run`; they hold only the broker's placeholders, and moto checks every signature
//! it gets (a wrong one is `SignatureDoesNotMatch`, an unknown key id `InvalidClientTokenId`).
//!
//! Presigned URLs are checked at a local origin instead (moto's IAM check needs an
//! `Authorization` header and fails on presigned requests): botocore's own signer, not the
//! broker's, decides whether the URL that arrived carries a valid signature of the real key.
//!
//! The clients come from `target/clients/aws-venv` (`scripts/test` makes it from
//! `tests/aws/requirements.txt`); without it the tests skip with a printed reason.

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use broker_integration::{
    contains, count_events, preset_ca_vars, run_bounded, shim_lib, target_dir, Home, Origin, Reply,
    TestCa,
};

const PLACEHOLDER_ID: &str = "AKIABROKERPLACEHOLDR";
const PLACEHOLDER_SECRET: &str = "brokerPlaceholderSecretAccessKey00000000";
const REGION: &str = "us-west-2";

/// `target/clients/aws-venv/bin`, if `scripts/test` made it.
fn aws_bin() -> Option<PathBuf> {
    let bin = target_dir()
        .parent()?
        .join("clients")
        .join("aws-venv")
        .join("bin");
    let ok = ["python3", "aws", "moto_server"]
        .iter()
        .all(|tool| bin.join(tool).exists());
    if !ok {
        broker_integration::skip(&format!("{} lacks python3, aws or moto_server (run ./scripts/test, which makes it from tests/aws/requirements.txt)",
            bin.display())
        );
    }
    ok.then_some(bin)
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("aws").join(name)
}

/// moto in server mode, TLS with a certificate from `ca`, IAM authentication on after the
/// bootstrap requests; killed when dropped.
struct Moto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Moto {
    fn start(bin: &Path, ca: &TestCa, names: &[&str]) -> Moto {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut all: Vec<&str> = names.to_vec();
        all.push("127.0.0.1");
        let (cert, key) = ca.leaf_pem(&all);
        std::fs::write(dir.path().join("cert.pem"), cert).expect("cert");
        std::fs::write(dir.path().join("key.pem"), key).expect("key");
        let mut child = Command::new(bin.join("moto_server"))
            .args(["-H", "127.0.0.1", "-p", "0", "-c"])
            .arg(dir.path().join("cert.pem"))
            .arg("-k")
            .arg(dir.path().join("key.pem"))
            // The bootstrap's five IAM calls pass unauthenticated; everything after is checked.
            .env("INITIAL_NO_AUTH_ACTION_COUNT", "5")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start moto_server");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = line
                    .split("https://127.0.0.1:")
                    .nth(1)
                    .and_then(|p| p.trim().parse::<u16>().ok())
                {
                    let _ = tx.send(port);
                }
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(port) => port,
            Err(_) => {
                let _ = child.kill();
                panic!("moto_server did not start within 120 s");
            }
        };
        Moto {
            child,
            port,
            _dir: dir,
        }
    }

    /// The IAM user and access key the broker will hold: `(id, secret)`.
    fn bootstrap(&self, bin: &Path, ca: &TestCa) -> (String, String) {
        let out = run_bounded(
            Command::new(bin.join("python3"))
                .arg(script("bootstrap.py"))
                .arg(format!("https://127.0.0.1:{}", self.port))
                .arg(&ca.pem_path)
                .stdin(Stdio::null()),
            Duration::from_secs(120),
        );
        assert!(
            out.status.success(),
            "bootstrap failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout);
        let mut words = text.split_whitespace();
        let id = words.next().expect("key id").to_string();
        let secret = words.next().expect("secret").to_string();
        (id, secret)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `broker run` with `hosts` resolved to `port` on this machine, the agent's AWS settings
/// pinned (region, no config files), the venv's tools first on `PATH`.
fn broker_run(home: &Home, ca: &TestCa, bin: &Path, port: u16, hosts: &[&str]) -> Command {
    let mut cmd = home.broker();
    cmd.arg("run").arg("--upstream-ca").arg(&ca.pem_path);
    for host in hosts {
        cmd.arg("--resolve")
            .arg(format!("{host}:443:127.0.0.1:{port}"));
    }
    agent_env(&mut cmd, bin);
    cmd.stdin(Stdio::null());
    cmd
}

fn agent_env(cmd: &mut Command, bin: &Path) {
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
    ] {
        cmd.env_remove(var);
    }
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    cmd.env("PATH", path)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_CONFIG_FILE", "/nonexistent/aws-config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/aws-credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

/// `broker add aws` (and `extra` arguments) with the credential on stdin, one value a line.
fn add_aws_with(home: &Home, id: &str, secret: &str, extra: &[&str]) {
    let mut args = vec!["add", "aws"];
    args.extend_from_slice(extra);
    let out = home.run_with_stdin(&args, &format!("{id}\n{secret}\n"));
    assert!(
        out.status.success(),
        "broker add aws failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!contains(&out.stderr, secret) && !contains(&out.stdout, secret));
}

fn add_aws(home: &Home, id: &str, secret: &str) {
    add_aws_with(home, id, secret, &[]);
}

/// Every check of a run whose agent must have held only placeholders: it succeeded, it saw
/// the placeholders, and the real secret is nowhere it could read or anywhere in plaintext.
fn check_run(label: &str, out: &std::process::Output, home: &Home, secret: &str) -> String {
    assert!(
        !contains(&out.stdout, secret) && !contains(&out.stderr, secret),
        "{label}: the real secret leaked into the run's output"
    );
    assert!(
        !contains(&home.all_bytes(), secret),
        "{label}: the real secret is in plaintext under BROKER_HOME"
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let context = format!(
        "{label}\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{}: {context}", out.status);
    assert!(
        stdout.lines().any(|l| l == format!("id={PLACEHOLDER_ID}")),
        "the agent did not hold the placeholder id: {context}"
    );
    stdout
}

#[test]
fn boto3_and_the_aws_cli_work_through_the_broker_with_only_placeholders() {
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let ca = TestCa::new();
    let buckets = ["agent-bucket-1", "agent-bucket-2", "cli-bucket"];
    let mut hosts = vec![
        "sts.us-west-2.amazonaws.com".to_string(),
        "s3.us-west-2.amazonaws.com".to_string(),
        "s3.dualstack.us-west-2.amazonaws.com".to_string(),
    ];
    hosts.extend(
        buckets
            .iter()
            .map(|b| format!("{b}.s3.us-west-2.amazonaws.com")),
    );
    hosts.push("cli-bucket.s3.dualstack.us-west-2.amazonaws.com".to_string());
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let moto = Moto::start(
        &bin,
        &ca,
        &[
            "*.s3.us-west-2.amazonaws.com",
            "s3.us-west-2.amazonaws.com",
            "sts.us-west-2.amazonaws.com",
            "*.s3.dualstack.us-west-2.amazonaws.com",
            "s3.dualstack.us-west-2.amazonaws.com",
        ],
    );
    let (id, secret) = moto.bootstrap(&bin, &ca);
    let home = Home::new();
    add_aws(&home, &id, &secret);

    // boto3, with the machine's CA variables scrubbed and then preset.
    for (preset, bucket) in [(false, buckets[0]), (true, buckets[1])] {
        let label = format!(
            "boto3 (CA variables {})",
            if preset { "preset" } else { "scrubbed" }
        );
        let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
        if preset {
            preset_ca_vars(&mut cmd);
        }
        cmd.arg("--")
            .arg(bin.join("python3"))
            .arg(script("agent_boto3.py"))
            .arg(bucket);
        let out = run_bounded(&mut cmd, Duration::from_secs(240));
        let stdout = check_run(&label, &out, &home, &secret);
        let context = format!(
            "{label}: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains(&format!("secret={PLACEHOLDER_SECRET}")),
            "{context}"
        );
        assert!(
            !stdout.contains(&id),
            "the agent saw the real key id: {context}"
        );
        assert!(stdout.contains("small=hello from the agent"), "{context}");
        assert!(stdout.contains("big-sha256-match=True"), "{context}");
        assert!(stdout.contains("listed=big.bin,small.txt"), "{context}");
        assert!(
            stdout.contains("arn=arn:aws:iam::123456789012:user/agent"),
            "STS did not know the agent as the stored key's user: {context}"
        );
    }

    // The aws CLI: a bucket, a 9 MiB file both ways (a multipart upload), STS.
    let work = tempfile::tempdir().expect("tempdir");
    let cli = r#"set -e
echo "id=$AWS_ACCESS_KEY_ID"
aws s3api create-bucket --bucket cli-bucket --create-bucket-configuration LocationConstraint=us-west-2 >/dev/null
head -c 9437184 /dev/urandom > "$WORK/big.bin"
aws s3 cp --only-show-errors "$WORK/big.bin" s3://cli-bucket/big.bin
aws s3 cp --only-show-errors s3://cli-bucket/big.bin "$WORK/back.bin"
cmp "$WORK/big.bin" "$WORK/back.bin" && echo cli-roundtrip-ok
aws sts get-caller-identity --query Arn --output text
AWS_USE_DUALSTACK_ENDPOINT=true aws s3 ls --debug s3://cli-bucket/ 2>"$WORK/debug.txt"
grep -q 'cli-bucket.s3.dualstack.us-west-2.amazonaws.com' "$WORK/debug.txt" && echo dualstack-host-used
"#;
    let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
    cmd.env("WORK", work.path()).args(["--", "sh", "-c", cli]);
    let out = run_bounded(&mut cmd, Duration::from_secs(300));
    let stdout = check_run("aws CLI", &out, &home, &secret);
    assert!(stdout.contains("cli-roundtrip-ok"), "aws CLI: {stdout}");
    // S3's dual-stack names are managed too (issue 22).
    assert!(
        stdout.contains("big.bin") && stdout.contains("dualstack-host-used"),
        "aws CLI, dual-stack: {stdout}"
    );
    assert!(
        stdout.contains("arn:aws:iam::123456789012:user/agent"),
        "aws CLI: {stdout}"
    );

    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 10);
    assert!(count_events(&audit, "credential_use") >= 10, "{audit}");
    assert!(!audit.contains(&secret));
}

#[test]
fn placeholders_alone_are_refused_by_moto_and_a_real_key_in_the_environment_is_handed_over() {
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let ca = TestCa::new();
    let moto = Moto::start(&bin, &ca, &["sts.us-west-2.amazonaws.com"]);
    let (id, secret) = moto.bootstrap(&bin, &ca);

    // A shell that exported a real key: `broker run` takes it for the run (nothing stored)
    // and the agent gets the placeholders.
    let home = Home::new();
    let agent = r#"echo "id=$AWS_ACCESS_KEY_ID"; echo "secret=$AWS_SECRET_ACCESS_KEY"
aws sts get-caller-identity --query Arn --output text"#;
    let mut cmd = broker_run(
        &home,
        &ca,
        &bin,
        moto.port,
        &["sts.us-west-2.amazonaws.com"],
    );
    cmd.env("AWS_ACCESS_KEY_ID", &id)
        .env("AWS_SECRET_ACCESS_KEY", &secret)
        .args(["--", "sh", "-c", agent]);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = check_run("handed over", &out, &home, &secret);
    assert!(
        stdout.contains(&format!("secret={PLACEHOLDER_SECRET}")),
        "{stdout}"
    );
    assert!(
        stdout.contains("arn:aws:iam::123456789012:user/agent"),
        "{stdout}"
    );

    // Without the broker, the placeholders are what moto gets, and it refuses them.
    let call = "import boto3; print(boto3.client('sts').get_caller_identity()['Arn'])";
    let mut cmd = Command::new(bin.join("python3"));
    agent_env(&mut cmd, &bin);
    cmd.args(["-c", call])
        .env("AWS_ACCESS_KEY_ID", PLACEHOLDER_ID)
        .env("AWS_SECRET_ACCESS_KEY", PLACEHOLDER_SECRET)
        .env(
            "AWS_ENDPOINT_URL",
            format!("https://127.0.0.1:{}", moto.port),
        )
        .env("AWS_CA_BUNDLE", &ca.pem_path)
        .stdin(Stdio::null());
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "moto accepted the placeholders");
    assert!(
        stderr.contains("InvalidClientTokenId"),
        "not refused as an unknown key: {stderr}"
    );
}

/// A local origin for a presigned URL's bucket: it records what it gets and answers 200.
fn presign_origin(ca: &TestCa, host: &str) -> Origin {
    Origin::start(ca, &[host], |_| {
        Reply::Text(200, "presigned-object-body".into())
    })
}

#[test]
fn a_presigned_url_is_resigned_and_a_smuggled_real_key_refused() {
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let (id, secret) = (
        "AKIAIOSFODNN7EXAMPLE",
        "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
    );
    // botocore presigns with the global name and the region in the scope.
    let host = "presign-bucket.s3.amazonaws.com";
    let ca = TestCa::new();
    let origin = presign_origin(&ca, host);
    let home = Home::new();
    add_aws(&home, id, secret);

    let agent = format!(
        r#"set -e
echo "id=$AWS_ACCESS_KEY_ID"
url=$(python3 {presign} presign-bucket report.txt)
echo "url=$url"
curl -sS "$url"; echo
smuggled=$(python3 {presign} presign-bucket report.txt AKIAREALLOOKINGKEY01 {fake_secret})
curl -sS -o /dev/null -w 'smuggled-status=%{{http_code}}\n' "$smuggled"
"#,
        presign = script("presign.py").display(),
        fake_secret = "x".repeat(40)
    );
    let mut cmd = broker_run(&home, &ca, &bin, origin.addr.port(), &[host]);
    cmd.args(["--", "sh", "-c", &agent]);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = check_run("presigned", &out, &home, secret);
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("url="))
        .expect("url");
    assert!(
        url.contains(&format!("X-Amz-Credential={PLACEHOLDER_ID}")),
        "{url}"
    );
    assert!(stdout.contains("presigned-object-body"), "{stdout}");
    assert!(stdout.contains("smuggled-status=403"), "{stdout}");

    let received = origin.requests();
    assert_eq!(
        received.len(),
        1,
        "only the placeholder's URL reached the origin"
    );
    let target = &received[0].target;
    assert!(
        target.contains(&format!("X-Amz-Credential={id}%2F")),
        "{target}"
    );
    assert!(!target.contains(PLACEHOLDER_ID), "{target}");
    let verdict = run_bounded(
        Command::new(bin.join("python3"))
            .arg(script("verify_presigned.py"))
            .args([host, target, id, secret, REGION])
            .stdin(Stdio::null()),
        Duration::from_secs(60),
    );
    assert_eq!(
        String::from_utf8_lossy(&verdict.stdout).trim(),
        "signature-ok",
        "botocore does not accept the broker's signature: {}",
        String::from_utf8_lossy(&verdict.stderr)
    );

    let audit = home.audit_until(|a| count_events(a, "real_key_from_agent") >= 1);
    assert_eq!(count_events(&audit, "real_key_from_agent"), 1, "{audit}");
    assert_eq!(count_events(&audit, "credential_use"), 1, "{audit}");
}

#[test]
fn a_role_is_assumed_by_the_broker_and_its_credentials_sign_the_requests() {
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let ca = TestCa::new();
    let hosts = ["sts.amazonaws.com", "sts.us-west-2.amazonaws.com"];
    let moto = Moto::start(&bin, &ca, &hosts);
    let (id, secret) = moto.bootstrap(&bin, &ca);
    let home = Home::new();
    add_aws_with(
        &home,
        &id,
        &secret,
        &["--role-arn", "arn:aws:iam::123456789012:role/agent-role"],
    );
    let agent = r#"set -e
echo "id=$AWS_ACCESS_KEY_ID"
aws sts get-caller-identity --query Arn --output text
aws sts get-caller-identity --query Arn --output text
"#;
    let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
    cmd.args(["--", "sh", "-c", agent]);
    let out = run_bounded(&mut cmd, Duration::from_secs(180));
    let stdout = check_run("assumed role", &out, &home, &secret);
    assert_eq!(
        stdout
            .matches("arn:aws:sts::123456789012:assumed-role/agent-role/broker-default")
            .count(),
        2,
        "the requests were not signed with the role's credentials: {stdout}"
    );
    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 2);
    assert_eq!(
        count_events(&audit, "refresh"),
        1,
        "one AssumeRole for both: {audit}"
    );
    assert_eq!(count_events(&audit, "credential_use"), 2, "{audit}");
}

#[test]
fn a_static_go_agent_signing_by_hand_goes_through_the_connect_fallback() {
    // The shim cannot reach a Go program: `broker run` gives it HTTPS_PROXY (the run's CONNECT
    // listener) instead, and the re-signing must work there too. moto checks the signature.
    let Some(bin) = aws_bin() else { return };
    let Some(go) = broker_integration::which("go") else {
        broker_integration::skip("no Go toolchain (apt-get install golang-go)");
        return;
    };
    let _ = shim_lib();
    let work = tempfile::tempdir().expect("tempdir");
    let agent = work.path().join("sts-agent");
    let cache = target_dir().join("go-cache");
    let mut build = Command::new(go);
    build
        .current_dir(work.path())
        .env("CGO_ENABLED", "0")
        .env("GOCACHE", &cache)
        .env("GOPATH", cache.join("gopath"))
        .env("GO111MODULE", "off")
        .args(["build", "-o"])
        .arg(&agent)
        .arg(script("sts_agent.go"));
    let out = run_bounded(&mut build, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "go build: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ca = TestCa::new();
    let hosts = ["sts.us-west-2.amazonaws.com"];
    let moto = Moto::start(&bin, &ca, &hosts);
    let (id, secret) = moto.bootstrap(&bin, &ca);
    let home = Home::new();
    add_aws(&home, &id, &secret);
    let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
    cmd.arg("--").arg(&agent);
    let out = run_bounded(&mut cmd, Duration::from_secs(120));
    let stdout = check_run("Go agent", &out, &home, &secret);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a Go program"), "{stderr}");
    assert!(
        stdout.contains("arn:aws:iam::123456789012:user/agent"),
        "STS did not know the Go agent as the stored key's user: {stdout}"
    );
    assert!(
        !stdout.contains(&id),
        "the agent saw the real key id: {stdout}"
    );
    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 1);
    assert_eq!(count_events(&audit, "credential_use"), 1, "{audit}");
}

/// How long the fake STS below makes role credentials last. The broker fetches new ones
/// `min(5 min, lifetime / 2)` before they expire, so here after 15 s.
const SHORT_ROLE_LIFETIME: time::Duration = time::Duration::seconds(30);

/// The access key id of the `n`th role credential the fake STS hands out (20 characters).
fn role_key_id(n: usize) -> String {
    format!("ASIAROLETESTKEY{n:05}")
}

#[test]
fn role_credentials_are_fetched_again_before_they_expire() {
    // STS never gives less than 15 minutes, so moto cannot show a refresh in a test's time: a
    // local origin plays STS (its AssumeRole answers last 30 s) and records every request.
    // Whether the signatures verify is the moto tests' business; this one checks which
    // credential signed what, and when the broker went back to STS.
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let ca = TestCa::new();
    let hosts = ["sts.amazonaws.com", "sts.us-west-2.amazonaws.com"];
    let issued: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let sts = {
        let issued = issued.clone();
        Origin::start(&ca, &hosts, move |req| {
            let body = String::from_utf8_lossy(&req.body);
            if !body.contains("Action=AssumeRole") {
                return Reply::Text(200, CALLER_IDENTITY.into());
            }
            let mut issued = issued.lock().expect("lock");
            let expires = time::OffsetDateTime::now_utc() + SHORT_ROLE_LIFETIME;
            issued.push(Instant::now());
            let n = issued.len();
            let expiration = expires
                .replace_nanosecond(0)
                .expect("nanosecond")
                .format(&time::format_description::well_known::Rfc3339)
                .expect("rfc3339");
            Reply::Text(
                200,
                format!(
                    "<AssumeRoleResponse><AssumeRoleResult><Credentials>\
                     <AccessKeyId>{}</AccessKeyId>\
                     <SecretAccessKey>roleSecretAccessKeyForTheTest{n:011}</SecretAccessKey>\
                     <SessionToken>role-session-token-{n}</SessionToken>\
                     <Expiration>{expiration}</Expiration>\
                     </Credentials></AssumeRoleResult></AssumeRoleResponse>",
                    role_key_id(n)
                ),
            )
        })
    };
    let (id, secret) = (
        "AKIAROLEBASEKEY00001",
        "roleBaseSecretAccessKeyForTheTest0000001",
    );
    let home = Home::new();
    add_aws_with(
        &home,
        id,
        secret,
        &["--role-arn", "arn:aws:iam::123456789012:role/agent-role"],
    );
    // The second call comes after the refresh point (15 s) and well before the first
    // credentials expire (30 s).
    let agent = r#"set -e
echo "id=$AWS_ACCESS_KEY_ID"
aws sts get-caller-identity --query Arn --output text
sleep 17
aws sts get-caller-identity --query Arn --output text
"#;
    let mut cmd = broker_run(&home, &ca, &bin, sts.addr.port(), &hosts);
    cmd.args(["--", "sh", "-c", agent]);
    let out = run_bounded(&mut cmd, Duration::from_secs(180));
    check_run("refreshed role", &out, &home, secret);

    let requests = sts.requests();
    let signer = |r: &broker_integration::OriginRequest| {
        r.header("authorization")
            .and_then(|a| a.split("Credential=").nth(1))
            .and_then(|c| c.split('/').next())
            .unwrap_or_default()
            .to_string()
    };
    let sequence: Vec<(bool, String)> = requests
        .iter()
        .map(|r| {
            let assume = String::from_utf8_lossy(&r.body).contains("Action=AssumeRole");
            (assume, signer(r))
        })
        .collect();
    assert_eq!(
        sequence,
        vec![
            (true, id.to_string()),
            (false, role_key_id(1)),
            (true, id.to_string()),
            (false, role_key_id(2)),
        ],
        "expected AssumeRole (signed with the stored key), a call with the role's first \
         credentials, AssumeRole again, a call with the second ones"
    );
    assert_eq!(
        requests[3].header("x-amz-security-token"),
        Some("role-session-token-2"),
        "the second call did not carry the new session token"
    );
    let issued = issued.lock().expect("lock");
    let first_expires_at = issued[0] + Duration::try_from(SHORT_ROLE_LIFETIME).expect("positive");
    assert!(
        issued[1] < first_expires_at,
        "the broker went back to STS only after the first credentials had expired"
    );
    let audit = home.audit_until(|a| count_events(a, "credential_use") >= 2);
    assert_eq!(count_events(&audit, "refresh"), 2, "{audit}");
}

const CALLER_IDENTITY: &str = "<GetCallerIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\
<GetCallerIdentityResult><Arn>arn:aws:sts::123456789012:assumed-role/agent-role/broker-default</Arn>\
<UserId>AROAEXAMPLE:broker-default</UserId><Account>123456789012</Account></GetCallerIdentityResult>\
<ResponseMetadata><RequestId>00000000-0000-0000-0000-000000000000</RequestId></ResponseMetadata>\
</GetCallerIdentityResponse>";

#[test]
fn a_streaming_signed_upload_is_resigned_chunk_by_chunk() {
    let Some(bin) = aws_bin() else { return };
    let _ = shim_lib();
    let ca = TestCa::new();
    let hosts = [
        "s3.us-west-2.amazonaws.com",
        "stream-bucket.s3.us-west-2.amazonaws.com",
    ];
    let moto = Moto::start(&bin, &ca, &hosts);
    let (id, secret) = moto.bootstrap(&bin, &ca);
    let home = Home::new();
    add_aws(&home, &id, &secret);
    // 3 MiB in 64 KiB chunks: 49 chunk signatures on each chain.
    let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
    cmd.arg("--")
        .arg(bin.join("python3"))
        .arg(script("streaming_put.py"))
        .args(["stream-bucket", "streamed.bin", "3145728"]);
    let out = run_bounded(&mut cmd, Duration::from_secs(180));
    let stdout = check_run("streaming", &out, &home, &secret);
    assert!(stdout.contains("put-status=200"), "{stdout}");
    assert!(stdout.contains("streaming-roundtrip-ok"), "{stdout}");

    // The same with a signed checksum trailer after the last chunk.
    let mut cmd = broker_run(&home, &ca, &bin, moto.port, &hosts);
    cmd.arg("--")
        .arg(bin.join("python3"))
        .arg(script("streaming_put.py"))
        .args(["stream-bucket", "trailed.bin", "1048576", "trailer"]);
    let out = run_bounded(&mut cmd, Duration::from_secs(180));
    let stdout = check_run("streaming with a signed trailer", &out, &home, &secret);
    assert!(stdout.contains("put-status=200"), "{stdout}");
    assert!(stdout.contains("streaming-roundtrip-ok"), "{stdout}");
}
