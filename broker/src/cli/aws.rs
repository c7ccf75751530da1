//! `broker add aws`: an AWS credential is three values, read the way every secret is (stdin
//! when it is not a terminal, else prompts that do not echo), never from argv.
//!
//! On stdin, either the values one per line (access key id, secret access key, optional
//! session token) or `name = value` lines as in `~/.aws/credentials`
//! (`aws_access_key_id`, `aws_secret_access_key`, `aws_session_token`; of several profiles,
//! `[default]`, else the first).

use std::io::IsTerminal as _;

use anyhow::{bail, Context as _};
use zeroize::Zeroizing;

use crate::providers::Provider;
use crate::proxy::sigv4::credential::AwsCredential;

/// The credential from stdin or the prompts, checked, in the vault's form.
pub fn read_credential(
    provider: &Provider,
    role_arn: Option<&str>,
) -> anyhow::Result<Zeroizing<String>> {
    let credential = if std::io::stdin().is_terminal() {
        let id = rpassword::prompt_password("AWS access key id (AKIA... or ASIA...): ")
            .context("cannot read the access key id")?;
        let secret = Zeroizing::new(
            rpassword::prompt_password("AWS secret access key (input hidden): ")
                .context("cannot read the secret access key")?,
        );
        let token = Zeroizing::new(
            rpassword::prompt_password(
                "AWS session token, for temporary credentials (Enter for none): ",
            )
            .context("cannot read the session token")?,
        );
        AwsCredential::new(&id, &secret, Some(&token))
    } else {
        let text = super::credentials::read_hidden("", "the AWS credential")?;
        let (id, secret, token) = parse_lines(&text)?;
        AwsCredential::new(&id, &secret, token.as_deref().map(|t| t.as_str()))
    };
    let credential = credential.and_then(|c| match role_arn {
        Some(arn) => c.with_role_arn(arn),
        None => Ok(c),
    });
    let credential = credential.map_err(|e| {
        anyhow::anyhow!(
            "{e}; nothing was stored (see {})",
            provider
                .docs_url
                .as_deref()
                .unwrap_or("the AWS IAM console")
        )
    })?;
    if credential.access_key_id == provider.placeholder {
        bail!("that is broker's placeholder access key id, not a real one (it is what agents see in AWS_ACCESS_KEY_ID)");
    }
    Ok(credential.encode())
}

type Parsed = (String, Zeroizing<String>, Option<Zeroizing<String>>);

/// The three values from `text`: named (`aws_access_key_id = ...`) or one per line.
fn parse_lines(text: &str) -> anyhow::Result<Parsed> {
    let (mut id, mut secret, mut token) = (None, None, None);
    let mut plain: Vec<&str> = Vec::new();
    // A credentials file with several profiles: its [default] one, else its first.
    let has_default = text.lines().any(|l| l.trim() == "[default]");
    let mut section: Option<&str> = None;
    let mut sections_seen = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.starts_with('[') {
            section = Some(line);
            sections_seen += 1;
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let wanted = match section {
            None => true,
            Some(name) if has_default => name == "[default]",
            Some(_) => sections_seen == 1,
        };
        if !wanted {
            continue;
        }
        match line.split_once('=') {
            Some((name, value)) if name.trim().to_ascii_lowercase().starts_with("aws_") => {
                let value = value.trim().to_string();
                match name.trim().to_ascii_lowercase().as_str() {
                    "aws_access_key_id" => id = Some(value),
                    "aws_secret_access_key" => secret = Some(Zeroizing::new(value)),
                    "aws_session_token" => token = Some(Zeroizing::new(value)),
                    _ => {}
                }
            }
            _ => plain.push(line),
        }
    }
    if id.is_none() && secret.is_none() {
        match plain[..] {
            [i, s] | [i, s, _] => {
                id = Some(i.to_string());
                secret = Some(Zeroizing::new(s.to_string()));
                token = plain.get(2).map(|t| Zeroizing::new(t.to_string()));
            }
            _ => bail!(
                "expected the access key id and the secret access key on stdin, one per line (and a session token on a third, for temporary credentials), or aws_access_key_id = ... lines; nothing was stored"
            ),
        }
    }
    match (id, secret) {
        (Some(id), Some(secret)) => Ok((id, secret, token)),
        _ => bail!(
            "stdin needs both aws_access_key_id and aws_secret_access_key; nothing was stored"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_credentials_file_forms() {
        let (id, secret, token) = parse_lines("AKIAIOSFODNN7EXAMPLE\nsecret\n").expect("two lines");
        assert_eq!(
            (id.as_str(), secret.as_str(), token),
            ("AKIAIOSFODNN7EXAMPLE", "secret", None)
        );
        let (_, _, token) = parse_lines("id\nsecret\ntoken\n").expect("three lines");
        assert_eq!(token.as_deref().map(|t| t.as_str()), Some("token"));
        let file = "[default]\naws_access_key_id = AKID\naws_secret_access_key=SECRET\nregion = us-east-1\n";
        let (id, secret, token) = parse_lines(file).expect("file form");
        assert_eq!(
            (id.as_str(), secret.as_str(), token),
            ("AKID", "SECRET", None)
        );
        let two = "[work]\naws_access_key_id = WORK\naws_secret_access_key = W\n[default]\naws_access_key_id = DEF\naws_secret_access_key = D\n";
        let (id, secret, _) = parse_lines(two).expect("default profile");
        assert_eq!((id.as_str(), secret.as_str()), ("DEF", "D"));
        let (id, _, _) = parse_lines(&two.replace("[default]", "[other]")).expect("first profile");
        assert_eq!(id, "WORK");
        assert!(parse_lines("only-one-line").is_err());
        assert!(parse_lines("aws_access_key_id = AKID\n").is_err());
    }
}
