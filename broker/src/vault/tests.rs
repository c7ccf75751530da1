#![allow(clippy::unwrap_used)]

use super::*;

const SECRET: &str = "sk-test-vault-unit-0000-not-real";

fn pass_keys(p: &str) -> KeyConfig {
    KeyConfig {
        source: None,
        passphrase: Some(Zeroizing::new(p.to_string())),
        system_key_file: None,
    }
}

fn temp_home() -> (tempfile::TempDir, Home) {
    let dir = tempfile::tempdir().unwrap();
    let home = Home::at(dir.path().join("home"));
    (dir, home)
}

fn dump(home: &Home) -> Vec<u8> {
    let mut all = Vec::new();
    for entry in fs::read_dir(home.root()).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            all.extend(fs::read(path).unwrap());
        }
    }
    all
}

#[test]
fn put_get_list_remove_round_trip() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_eq!(vault.key_source(), KeySource::File);
    assert_eq!(
        vault
            .put("openai", "default", SECRET, CredentialKind::ApiKey)
            .unwrap(),
        PutOutcome::Added
    );
    assert_eq!(
        vault.get("openai", "default").unwrap().unwrap().expose(),
        SECRET
    );
    assert!(vault.get("openai", "work").unwrap().is_none());
    assert_eq!(
        vault
            .put(
                "openai",
                "default",
                "sk-test-replaced-key",
                CredentialKind::ApiKey
            )
            .unwrap(),
        PutOutcome::Replaced
    );
    drop(vault);

    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_eq!(
        vault.get("openai", "default").unwrap().unwrap().expose(),
        "sk-test-replaced-key"
    );
    let list = vault.list().unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(
        (list[0].provider.as_str(), list[0].kind),
        ("openai", CredentialKind::ApiKey)
    );
    assert_eq!(vault.info("openai", "default").unwrap().unwrap(), list[0]);
    assert!(vault.verify().unwrap().is_ok());
    assert!(vault.remove("openai", "default").unwrap());
    assert!(!vault.remove("openai", "default").unwrap());
    assert!(vault.list().unwrap().is_empty());
}

#[test]
fn files_are_private_and_hold_no_plaintext() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    drop(vault);
    for name in ["vault.db", "master.key"] {
        let mode = fs::metadata(home.root().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{name}");
    }
    let all = dump(&home);
    assert!(!all.windows(SECRET.len()).any(|w| w == SECRET.as_bytes()));
}

#[test]
fn secret_debug_and_mask_hide_the_value() {
    let s = Secret::new("sk-proj-abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKL".into());
    assert_eq!(format!("{s:?}"), "***");
    assert_eq!(s.masked(), "sk-…(56 chars)");
    assert_eq!(
        Secret::new("ghp_0123456789abcdefghij".into()).masked(),
        "ghp_…(24 chars)"
    );
    assert_eq!(
        Secret::new("0123456789abcdef0123".into()).masked(),
        "…(20 chars)"
    );
    assert_eq!(Secret::new("sk-short".into()).masked(), "…(8 chars)");
}

#[test]
fn blob_swapped_between_rows_does_not_open() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    vault
        .put(
            "github",
            "default",
            "ghp-test-other",
            CredentialKind::ApiKey,
        )
        .unwrap();
    vault
        .lock()
        .execute(
            "UPDATE credentials SET secret = (SELECT secret FROM credentials WHERE provider = 'openai')
             WHERE provider = 'github'",
            [],
        )
        .unwrap();
    assert!(matches!(
        vault.get("github", "default"),
        Err(VaultError::Integrity { .. })
    ));
    let report = vault.verify().unwrap();
    assert_eq!(report.unreadable, vec!["github/default".to_string()]);
}

#[test]
fn missing_key_file_never_rekeys() {
    let (_d, home) = temp_home();
    Vault::open_with(&home, &test_key_file())
        .unwrap()
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    let before = fs::read(home.vault_path()).unwrap();
    fs::remove_file(home.key_file_path()).unwrap();
    for keys in [test_key_file(), KeyConfig::default()] {
        let err = Vault::open_with(&home, &keys).unwrap_err();
        assert!(matches!(err, VaultError::KeyFileMissing { .. }), "{err}");
        assert!(err.to_string().contains("Restore master.key"), "{err}");
    }
    assert!(!home.key_file_path().exists(), "no new key file may appear");
    assert_eq!(fs::read(home.vault_path()).unwrap(), before);
}

#[test]
fn foreign_key_file_is_refused_and_changes_nothing() {
    let (_d, home) = temp_home();
    Vault::open_with(&home, &test_key_file())
        .unwrap()
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    fs::remove_file(home.key_file_path()).unwrap();
    keysource::create_key_file(&home.key_file_path(), &[9u8; KEY_LEN]).unwrap();
    let err = Vault::open_with(&home, &test_key_file()).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey { .. }), "{err}");
}

#[test]
fn insecure_key_file_is_refused() {
    let (_d, home) = temp_home();
    Vault::open_with(&home, &test_key_file()).unwrap();
    fs::set_permissions(home.key_file_path(), fs::Permissions::from_mode(0o644)).unwrap();
    let err = Vault::open_with(&home, &test_key_file()).unwrap_err();
    assert!(matches!(err, VaultError::KeyFileInsecure { .. }), "{err}");
}

#[test]
fn passphrase_vault_wrong_or_missing_passphrase_changes_nothing() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &pass_keys("correct horse")).unwrap();
    assert_eq!(vault.key_source(), KeySource::Passphrase);
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    drop(vault);
    assert!(!home.key_file_path().exists());
    let before = fs::read(home.vault_path()).unwrap();

    let err = Vault::open_with(&home, &pass_keys("wrong horse")).unwrap_err();
    assert!(matches!(err, VaultError::WrongPassphrase { .. }), "{err}");
    assert!(err.to_string().contains("wrong passphrase"), "{err}");
    let err = Vault::open_with(&home, &KeyConfig::default()).unwrap_err();
    assert!(
        matches!(err, VaultError::PassphraseRequired { .. }),
        "{err}"
    );
    // Asking for another source is refused, not honoured by re-keying.
    let err = Vault::open_with(&home, &test_key_file()).unwrap_err();
    assert!(matches!(err, VaultError::SourceMismatch { .. }), "{err}");
    assert!(!home.key_file_path().exists());
    assert_eq!(fs::read(home.vault_path()).unwrap(), before);

    let vault = Vault::open_with(&home, &pass_keys("correct horse")).unwrap();
    assert_eq!(
        vault.get("openai", "default").unwrap().unwrap().expose(),
        SECRET
    );
}

#[test]
fn forced_passphrase_source_needs_a_passphrase() {
    let (_d, home) = temp_home();
    let keys = KeyConfig {
        source: Some(KeySource::Passphrase),
        passphrase: None,
        system_key_file: None,
    };
    assert!(matches!(
        Vault::open_with(&home, &keys),
        Err(VaultError::PassphraseMissingForNewVault)
    ));
}

#[test]
fn names_and_secrets_are_checked() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    for (provider, profile) in [
        ("", "default"),
        ("open ai", "default"),
        ("openai", "a/b"),
        ("openai", ""),
    ] {
        assert!(matches!(
            vault.put(provider, profile, SECRET, CredentialKind::ApiKey),
            Err(VaultError::InvalidName { .. })
        ));
    }
    for bad in ["", "two\nlines", "tab\there"] {
        let err = vault
            .put("openai", "default", bad, CredentialKind::ApiKey)
            .unwrap_err();
        assert!(matches!(err, VaultError::InvalidSecret(_)));
        if !bad.is_empty() {
            assert!(!err.to_string().contains(bad));
        }
    }
}

#[test]
fn threads_sharing_one_vault_and_separate_opens_lose_nothing() {
    let (_d, home) = temp_home();
    let shared = std::sync::Arc::new(Vault::open_with(&home, &test_key_file()).unwrap());
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let shared = shared.clone();
            let home = home.clone();
            std::thread::spawn(move || {
                let own = Vault::open_with(&home, &test_key_file()).unwrap();
                for i in 0..10 {
                    let v = if t % 2 == 0 { &*shared } else { &own };
                    let profile = format!("p{t}-{i}");
                    v.put(
                        "openai",
                        &profile,
                        &format!("sk-test-{t}-{i}"),
                        CredentialKind::ApiKey,
                    )
                    .unwrap();
                    assert_eq!(
                        v.get("openai", &profile).unwrap().unwrap().expose(),
                        format!("sk-test-{t}-{i}")
                    );
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(shared.list().unwrap().len(), 60);
}

#[test]
fn concurrent_first_open_makes_one_data_key() {
    let (_d, home) = temp_home();
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let home = home.clone();
            std::thread::spawn(move || {
                let v = Vault::open_with(&home, &test_key_file()).unwrap();
                v.put("p", &format!("t{t}"), SECRET, CredentialKind::ApiKey)
                    .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let v = Vault::open_with(&home, &test_key_file()).unwrap();
    let report = v.verify().unwrap();
    assert_eq!(
        report,
        VerifyReport {
            credentials: 6,
            unreadable: vec![]
        }
    );
}

#[test]
fn newer_schema_is_refused() {
    let (_d, home) = temp_home();
    drop(Vault::open_with(&home, &test_key_file()).unwrap());
    Connection::open(home.vault_path())
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        Vault::open_with(&home, &test_key_file()),
        Err(VaultError::TooNew { found: 99, .. })
    ));
}

#[test]
fn vault_and_audit_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Vault>();
    assert_send_sync::<crate::audit::Audit>();
}

/// A vault opened with `keys` holding SECRET for openai/default.
fn vault_with_secret(home: &Home, keys: &KeyConfig) -> Vault {
    let vault = Vault::open_with(home, keys).unwrap();
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    vault
}

fn reopen_get(home: &Home, keys: &KeyConfig) -> Result<String, VaultError> {
    let vault = Vault::open_with(home, keys)?;
    Ok(vault
        .get("openai", "default")?
        .unwrap()
        .expose()
        .to_string())
}

#[test]
fn rekey_moves_the_key_between_sources_and_the_secrets_stay() {
    let (_d, home) = temp_home();
    let vault = vault_with_secret(&home, &test_key_file());
    let first_key = fs::read(home.key_file_path()).unwrap();

    // Key file -> passphrase: the key file goes, the passphrase opens it.
    vault
        .rekey(
            &home,
            &KeyConfig::default(),
            KeySource::Passphrase,
            Some("first pass"),
        )
        .unwrap();
    assert!(
        !home.key_file_path().exists(),
        "the old key file was removed"
    );
    assert_eq!(reopen_get(&home, &pass_keys("first pass")).unwrap(), SECRET);
    let mismatch = reopen_get(&home, &test_key_file()).unwrap_err();
    assert!(
        mismatch.to_string().contains("broker rekey --to file`"),
        "{mismatch}"
    );

    // Passphrase -> another passphrase: the old one no longer opens it.
    let vault = Vault::open_with(&home, &pass_keys("first pass")).unwrap();
    vault
        .rekey(
            &home,
            &pass_keys("first pass"),
            KeySource::Passphrase,
            Some("second pass"),
        )
        .unwrap();
    assert!(matches!(
        reopen_get(&home, &pass_keys("first pass")),
        Err(VaultError::WrongPassphrase { .. })
    ));
    assert_eq!(
        reopen_get(&home, &pass_keys("second pass")).unwrap(),
        SECRET
    );

    // Passphrase -> key file, then key file -> a new key file.
    let vault = Vault::open_with(&home, &pass_keys("second pass")).unwrap();
    vault
        .rekey(&home, &pass_keys("second pass"), KeySource::File, None)
        .unwrap();
    let second_key = fs::read(home.key_file_path()).unwrap();
    assert_ne!(first_key, second_key, "a new key, not the old file's");
    assert_eq!(reopen_get(&home, &test_key_file()).unwrap(), SECRET);
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    vault
        .rekey(&home, &test_key_file(), KeySource::File, None)
        .unwrap();
    assert_ne!(fs::read(home.key_file_path()).unwrap(), second_key);
    assert!(!pending_key_file(&home).exists());
    assert_eq!(reopen_get(&home, &test_key_file()).unwrap(), SECRET);
    assert!(!contains(&dump(&home), SECRET.as_bytes()));
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn rekey_without_a_new_passphrase_or_with_the_wrong_old_one_changes_nothing() {
    let (_d, home) = temp_home();
    let vault = vault_with_secret(&home, &pass_keys("right"));
    assert!(matches!(
        vault.rekey(&home, &pass_keys("right"), KeySource::Passphrase, Some("")),
        Err(VaultError::NewPassphraseMissing)
    ));
    let vault = Vault::open_with(&home, &pass_keys("right")).unwrap();
    assert!(matches!(
        vault.rekey(&home, &pass_keys("wrong"), KeySource::File, None),
        Err(VaultError::WrongPassphrase { .. })
    ));
    assert!(!home.key_file_path().exists() && !pending_key_file(&home).exists());
    assert_eq!(reopen_get(&home, &pass_keys("right")).unwrap(), SECRET);
}

/// A stop after the transaction that switched the vault to the new key file but before the
/// rename: both files are there, and the next open finishes the move.
#[test]
fn a_rekey_stopped_before_its_rename_is_finished_by_the_next_open() {
    let (_d, home) = temp_home();
    let vault = vault_with_secret(&home, &test_key_file());
    drop(vault);
    let old_key = fs::read(home.key_file_path()).unwrap();
    // What `rekey` does up to its commit.
    let conn = Connection::open(home.vault_path()).unwrap();
    let meta = read_meta(&conn, &home.vault_path()).unwrap().unwrap();
    let data_key = unlock_raw(&home, &home.vault_path(), &meta, &test_key_file())
        .unwrap()
        .data_key;
    let new_key = crypto::random_key().unwrap();
    keysource::create_key_file(&pending_key_file(&home), &new_key).unwrap();
    let wrapped = SealingKey::new(&new_key)
        .seal(data_key.as_ref(), DATA_KEY_AAD)
        .unwrap();
    conn.execute(
        "UPDATE vault_meta SET wrapped_data_key = ?1 WHERE id = 1",
        params![wrapped],
    )
    .unwrap();
    drop(conn);

    assert_eq!(reopen_get(&home, &test_key_file()).unwrap(), SECRET);
    assert!(!pending_key_file(&home).exists(), "renamed into place");
    assert_ne!(fs::read(home.key_file_path()).unwrap(), old_key);
    assert_eq!(reopen_get(&home, &test_key_file()).unwrap(), SECRET);
}

#[test]
fn rekey_to_a_keyring_that_cannot_take_the_key_changes_nothing() {
    let (_d, home) = temp_home();
    let vault = vault_with_secret(&home, &test_key_file());
    match vault.rekey(&home, &test_key_file(), KeySource::Keyring, None) {
        // A machine with a working keyring (a desktop session).
        Ok(()) => {
            let keys = KeyConfig::default();
            assert_eq!(reopen_get(&home, &keys).unwrap(), SECRET);
            assert!(!home.key_file_path().exists());
        }
        // Headless, as in CI: the vault stays with its key file.
        Err(err) => {
            assert!(
                matches!(err, VaultError::KeyringUnusableForRekey { .. }),
                "{err}"
            );
            assert!(err.to_string().contains("nothing was changed"), "{err}");
            assert_eq!(reopen_get(&home, &test_key_file()).unwrap(), SECRET);
        }
    }
}

const OAUTH_META: &str = r#"{"token_url":"https://idp.example/token","client_id":"c1","client_auth":"post","grant":"authorization_code","scopes":[]}"#;

/// A vault with an API key, a command and an OAuth login (refresh token and client secret).
fn vault_with_every_kind(home: &Home) -> Vault {
    let vault = Vault::open_with(home, &test_key_file()).unwrap();
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    vault
        .put_with_metadata(
            "github",
            "default",
            "printf ghp_unit0123456789",
            CredentialKind::Command,
            r#"{"ttl_secs":60}"#,
        )
        .unwrap();
    vault
        .put_oauth(
            "acme",
            "work",
            &TokenUpdate {
                access: "at-unit-access-0123456789",
                refresh: Some("rt-unit-refresh-0123456789"),
                expires_at: Some("2099-01-01T00:00:00Z".into()),
                metadata: OAUTH_META,
            },
            Some("cs-unit-client-secret-0123456789"),
        )
        .unwrap();
    vault
}

fn assert_integrity_error(vault: &Vault, provider: &str, profile: &str, edit: &str) {
    let err = vault.get_full(provider, profile).expect_err(edit);
    assert!(
        matches!(&err, VaultError::Integrity { provider: p, profile: q } if p == provider && q == profile),
        "{edit}: {err}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&format!(
            "credential {provider}/{profile} failed its integrity check"
        )) && message.contains(&format!("broker remove {provider}"))
            && message.contains(&format!("broker add {provider}")),
        "{edit}: {message}"
    );
    for secret in [
        SECRET,
        "ghp_unit0123456789",
        "at-unit",
        "rt-unit",
        "cs-unit",
    ] {
        assert!(
            !message.contains(secret),
            "{edit}: the message holds a secret"
        );
    }
    assert!(vault.get(provider, profile).is_err(), "{edit}: get");
    let info = vault.info(provider, profile).unwrap().unwrap();
    assert!(!info.integrity_ok, "{edit}: info");
    let listed = vault.list().unwrap();
    let bad: Vec<_> = listed.iter().filter(|i| !i.integrity_ok).collect();
    assert_eq!(bad.len(), 1, "{edit}: list");
    assert_eq!(
        vault.verify().unwrap().unreadable,
        vec![format!("{provider}/{profile}")],
        "{edit}: verify"
    );
}

/// Every column of a row edited outside broker (as with `sqlite3 vault.db "UPDATE ..."`) makes
/// that credential fail its integrity check, and only that one; putting the column back makes
/// it open again (the check is on the content, not a flag).
#[test]
fn every_column_of_a_row_edited_outside_broker_fails_its_integrity_check() {
    let (_d, home) = temp_home();
    let vault = vault_with_every_kind(&home);
    assert!(vault.verify().unwrap().is_ok());
    assert!(vault.list().unwrap().iter().all(|i| i.integrity_ok));
    let columns =
        "kind, secret, refresh_secret, client_secret, expires_at, metadata, created_at, updated_at";
    let edits: &[(&str, &str, &str)] = &[
        ("openai", "default", "UPDATE credentials SET kind = 'command' WHERE provider = 'openai'"),
        ("openai", "default", "UPDATE credentials SET kind = 'oauth2' WHERE provider = 'openai'"),
        ("openai", "default", r#"UPDATE credentials SET metadata = '{"ttl_secs":1}' WHERE provider = 'openai'"#),
        ("openai", "default", "UPDATE credentials SET expires_at = '2000-01-01T00:00:00Z' WHERE provider = 'openai'"),
        ("openai", "default", "UPDATE credentials SET created_at = '2000-01-01T00:00:00Z' WHERE provider = 'openai'"),
        ("openai", "default", "UPDATE credentials SET updated_at = '2000-01-01T00:00:00Z' WHERE provider = 'openai'"),
        ("github", "default", "UPDATE credentials SET kind = 'api_key' WHERE provider = 'github'"),
        ("github", "default", r#"UPDATE credentials SET metadata = '{"ttl_secs":999999}' WHERE provider = 'github'"#),
        // The command itself: another row's sealed blob in its place.
        ("github", "default", "UPDATE credentials SET secret = (SELECT secret FROM credentials WHERE provider = 'openai') WHERE provider = 'github'"),
        ("acme", "work", "UPDATE credentials SET kind = 'api_key' WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET kind = 'command' WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET metadata = replace(metadata, 'https://idp.example/token', 'http://127.0.0.1:9/token') WHERE provider = 'acme'"),
        ("acme", "work", r#"UPDATE credentials SET metadata = replace(metadata, '"c1"', '"c2"') WHERE provider = 'acme'"#),
        ("acme", "work", "UPDATE credentials SET expires_at = '2000-01-01T00:00:00Z' WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET expires_at = NULL WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET refresh_secret = NULL WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET client_secret = NULL WHERE provider = 'acme'"),
        ("acme", "work", "UPDATE credentials SET refresh_secret = client_secret WHERE provider = 'acme'"),
    ];
    for (provider, profile, edit) in edits {
        // Keep the row as it is, edit it, check, put it back.
        let saved: Vec<rusqlite::types::Value> = {
            let conn = vault.lock();
            conn.query_row(
                &format!("SELECT {columns} FROM credentials WHERE provider = ?1"),
                [provider],
                |r| (0..8).map(|i| r.get(i)).collect(),
            )
            .unwrap()
        };
        vault.lock().execute(edit, []).unwrap();
        assert_integrity_error(&vault, provider, profile, edit);
        vault
            .lock()
            .execute(
                "UPDATE credentials SET kind = ?2, secret = ?3, refresh_secret = ?4, client_secret = ?5,
                 expires_at = ?6, metadata = ?7, created_at = ?8, updated_at = ?9 WHERE provider = ?1",
                rusqlite::params_from_iter(
                    std::iter::once(rusqlite::types::Value::Text(provider.to_string()))
                        .chain(saved),
                ),
            )
            .unwrap();
        assert!(vault.verify().unwrap().is_ok(), "{edit}: restored");
    }
    // A row renamed to another provider or profile.
    vault
        .lock()
        .execute(
            "UPDATE credentials SET profile = 'other' WHERE provider = 'openai'",
            [],
        )
        .unwrap();
    assert_integrity_error(&vault, "openai", "other", "profile renamed");
    // Whatever was edited, removing the row and adding it again recovers.
    assert!(vault.remove("openai", "other").unwrap());
    vault
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    assert!(vault.verify().unwrap().is_ok());
    assert_eq!(
        vault.get("openai", "default").unwrap().unwrap().expose(),
        SECRET
    );
}

/// Writes that change one column (a refresh's new expiry, metadata marking a login expired)
/// seal the row again, so it keeps opening; an edit after them is still caught.
#[test]
fn writes_through_the_broker_re_seal_the_row() {
    let (_d, home) = temp_home();
    let vault = vault_with_every_kind(&home);
    vault
        .with_credential_lock::<_, VaultError>("acme", "work", |c| {
            c.store_tokens(&TokenUpdate {
                access: "at-unit-access-2",
                refresh: None,
                expires_at: Some("2099-06-01T00:00:00Z".into()),
                metadata: OAUTH_META,
            })?;
            c.set_metadata(
                &OAUTH_META.replace("\"scopes\":[]", "\"scopes\":[],\"login_expired\":true"),
            )
        })
        .unwrap();
    let got = vault.get_full("acme", "work").unwrap().unwrap();
    assert_eq!(got.secret.expose(), "at-unit-access-2");
    assert_eq!(
        got.refresh.as_ref().map(Secret::expose),
        Some("rt-unit-refresh-0123456789")
    );
    assert_eq!(
        got.client_secret.as_ref().map(Secret::expose),
        Some("cs-unit-client-secret-0123456789")
    );
    assert_eq!(got.expires_at.as_deref(), Some("2099-06-01T00:00:00Z"));
    assert!(got.metadata.contains("login_expired"));
    assert!(vault.verify().unwrap().is_ok());
    vault
        .lock()
        .execute(
            "UPDATE credentials SET metadata = ?1 WHERE provider = 'acme'",
            [OAUTH_META],
        )
        .unwrap();
    assert_integrity_error(&vault, "acme", "work", "login_expired cleared");
    // A broker write does not bless an edited row: it refuses to read it.
    let r =
        vault.with_credential_lock::<_, VaultError>("acme", "work", |c| c.set_metadata(OAUTH_META));
    assert!(matches!(r, Err(VaultError::Integrity { .. })));
    assert_integrity_error(&vault, "acme", "work", "after a refused write");
    // A command added with its TTL in one step.
    let github = vault.get_full("github", "default").unwrap().unwrap();
    assert_eq!(github.kind, CredentialKind::Command);
    assert_eq!(github.metadata, r#"{"ttl_secs":60}"#);
}

/// A copy of the fixture vault made by the release before row authentication.
fn fixture_home() -> (tempfile::TempDir, Home) {
    let (dir, home) = temp_home();
    fs::create_dir_all(home.root()).unwrap();
    fs::set_permissions(home.root(), fs::Permissions::from_mode(0o700)).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vault-v3");
    for name in ["vault.db", "master.key"] {
        fs::copy(fixture.join(name), home.root().join(name)).unwrap();
        fs::set_permissions(home.root().join(name), fs::Permissions::from_mode(0o600)).unwrap();
    }
    (dir, home)
}

fn row_format(home: &Home) -> RowFormat {
    let conn = Connection::open(home.vault_path()).unwrap();
    let meta = read_meta(&conn, &home.vault_path()).unwrap().unwrap();
    unlock_raw(home, &home.vault_path(), &meta, &test_key_file())
        .unwrap()
        .format
}

#[test]
fn a_vault_of_the_previous_release_is_migrated_and_keeps_every_credential() {
    let (_d, home) = fixture_home();
    assert_eq!(row_format(&home), RowFormat::V1);
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_eq!(row_format(&home), RowFormat::V2);
    let user_version: i64 = vault
        .lock()
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!(user_version, schema::SCHEMA_VERSION);
    let report = vault.verify().unwrap();
    assert_eq!((report.credentials, report.is_ok()), (4, true));
    let get = |p: &str, q: &str| vault.get_full(p, q).unwrap().unwrap();
    let openai = get("openai", "default");
    assert_eq!(
        (openai.kind, openai.secret.expose()),
        (
            CredentialKind::ApiKey,
            "sk-fixture-openai-key-0123456789abcdef"
        )
    );
    let anthropic = get("anthropic", "work");
    assert_eq!(
        anthropic.secret.expose(),
        "sk-ant-fixture-anthropic-key-0123456789"
    );
    let github = get("github", "default");
    assert_eq!(
        (
            github.kind,
            github.secret.expose(),
            github.metadata.as_str()
        ),
        (
            CredentialKind::Command,
            "printf fixture-command-output-not-a-key",
            r#"{"ttl_secs":120}"#
        )
    );
    let acme = get("acme", "default");
    assert_eq!(acme.kind, CredentialKind::OAuth2);
    assert_eq!(acme.secret.expose(), "at-fixture-access-token-0123456789");
    assert_eq!(
        acme.refresh.as_ref().map(Secret::expose),
        Some("rt-fixture-refresh-token-0123456789")
    );
    assert_eq!(
        acme.client_secret.as_ref().map(Secret::expose),
        Some("cs-fixture-client-secret-0123456789")
    );
    assert_eq!(acme.expires_at.as_deref(), Some("2030-01-01T00:00:00Z"));
    assert!(acme
        .metadata
        .contains("\"token_url\":\"https://idp.example/token\""));
    assert_eq!(vault.list().unwrap().len(), 4);

    // Migrated rows are bound like new ones; setting the schema version back migrates nothing
    // again (the format is in the wrapped data key), and the edit stays caught.
    {
        let conn = vault.lock();
        conn.execute(
            "UPDATE credentials SET kind = 'command' WHERE provider = 'openai'",
            [],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 3).unwrap();
    }
    drop(vault);
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_integrity_error(
        &vault,
        "openai",
        "default",
        "kind edited after the migration",
    );
    assert_eq!(
        vault.get("anthropic", "work").unwrap().unwrap().expose(),
        "sk-ant-fixture-anthropic-key-0123456789"
    );
}

/// A format-1 row that does not open (here: a blob moved from another row before the upgrade)
/// is not blessed by the migration: it fails its integrity check afterwards, and the rest
/// migrate.
#[test]
fn the_migration_leaves_a_row_that_does_not_open_failing() {
    let (_d, home) = fixture_home();
    Connection::open(home.vault_path())
        .unwrap()
        .execute(
            "UPDATE credentials SET secret = (SELECT secret FROM credentials WHERE provider = 'openai')
             WHERE provider = 'anthropic'",
            [],
        )
        .unwrap();
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_eq!(row_format(&home), RowFormat::V2);
    assert_integrity_error(&vault, "anthropic", "work", "moved before the migration");
    assert_eq!(
        vault.get("openai", "default").unwrap().unwrap().expose(),
        "sk-fixture-openai-key-0123456789abcdef"
    );
}

/// Processes opening a format-1 vault at once: one migrates, every one reads every credential.
#[test]
fn concurrent_opens_of_a_previous_release_vault_migrate_once() {
    let (_d, home) = fixture_home();
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let home = home.clone();
            std::thread::spawn(move || {
                let vault = Vault::open_with(&home, &test_key_file()).unwrap();
                assert!(vault.verify().unwrap().is_ok());
                vault
                    .get("openai", "default")
                    .unwrap()
                    .unwrap()
                    .expose()
                    .to_string()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), "sk-fixture-openai-key-0123456789abcdef");
    }
    assert_eq!(row_format(&home), RowFormat::V2);
}

/// A name written outside broker reaches no terminal as it is.
#[test]
fn a_row_renamed_outside_broker_is_reported_with_a_printable_name() {
    let (_d, home) = temp_home();
    let vault = vault_with_every_kind(&home);
    vault
        .lock()
        .execute(
            "UPDATE credentials SET provider = 'open' || char(27) || '[2Jai' WHERE provider = 'openai'",
            [],
        )
        .unwrap();
    assert_eq!(
        vault.verify().unwrap().unreadable,
        vec!["open??2Jai/default".to_string()]
    );
    let listed = vault.list().unwrap();
    let bad: Vec<_> = listed.iter().filter(|i| !i.integrity_ok).collect();
    assert_eq!(bad.len(), 1);
    assert_eq!(bad[0].provider, "open??2Jai");
}

/// The migration is all or nothing: a failure on its third row (injected with a trigger) leaves
/// every row and the key record as they were, in format 1, and the next open migrates them all.
#[test]
fn a_migration_that_fails_midway_changes_nothing() {
    let (_d, home) = fixture_home();
    let blobs = |conn: &Connection| -> Vec<(String, Vec<u8>)> {
        let mut stmt = conn
            .prepare("SELECT provider, secret FROM credentials ORDER BY provider")
            .unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.collect::<Result<_, _>>().unwrap()
    };
    let conn = Connection::open(home.vault_path()).unwrap();
    let before = blobs(&conn);
    let wrapped_before: Vec<u8> = conn
        .query_row("SELECT wrapped_data_key FROM vault_meta", [], |r| r.get(0))
        .unwrap();
    conn.execute_batch(
        "CREATE TRIGGER fail_midway BEFORE UPDATE ON credentials WHEN old.provider = 'github'
         BEGIN SELECT RAISE(ABORT, 'injected failure'); END;",
    )
    .unwrap();
    drop(conn);
    let err = Vault::open_with(&home, &test_key_file()).expect_err("the migration fails");
    assert!(err.to_string().contains("injected failure"), "{err}");
    let conn = Connection::open(home.vault_path()).unwrap();
    assert_eq!(blobs(&conn), before, "no row was re-sealed");
    let wrapped: Vec<u8> = conn
        .query_row("SELECT wrapped_data_key FROM vault_meta", [], |r| r.get(0))
        .unwrap();
    assert_eq!(wrapped, wrapped_before);
    assert_eq!(row_format(&home), RowFormat::V1);
    conn.execute_batch("DROP TRIGGER fail_midway").unwrap();
    drop(conn);
    let vault = Vault::open_with(&home, &test_key_file()).unwrap();
    assert_eq!(row_format(&home), RowFormat::V2);
    let report = vault.verify().unwrap();
    assert_eq!((report.credentials, report.is_ok()), (4, true));
    assert_eq!(
        vault.get("github", "default").unwrap().unwrap().expose(),
        "printf fixture-command-output-not-a-key"
    );
}

/// A daemon's proof checks only against the vault it was made with, and only for its challenge.
#[test]
fn a_control_proof_checks_only_for_its_vault_and_challenge() {
    let (_d1, home1) = temp_home();
    let (_d2, home2) = temp_home();
    let vault = Vault::open_with(&home1, &test_key_file()).unwrap();
    let other = Vault::open_with(&home2, &test_key_file()).unwrap();
    let proof = vault.prove(b"challenge-1").unwrap();
    assert!(vault.check_proof(b"challenge-1", &proof));
    assert!(!vault.check_proof(b"challenge-2", &proof));
    assert!(!other.check_proof(b"challenge-1", &proof));
    assert!(!vault.check_proof(b"challenge-1", &other.prove(b"challenge-1").unwrap()));
}
