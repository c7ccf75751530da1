#![allow(clippy::unwrap_used)]

use super::*;

const SECRET: &str = "sk-test-vault-unit-0000-not-real";

fn file_keys() -> KeyConfig {
    KeyConfig {
        source: Some(KeySource::File),
        passphrase: None,
    }
}

fn pass_keys(p: &str) -> KeyConfig {
    KeyConfig {
        source: None,
        passphrase: Some(Zeroizing::new(p.to_string())),
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
    let vault = Vault::open_with(&home, &file_keys()).unwrap();
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

    let vault = Vault::open_with(&home, &file_keys()).unwrap();
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
    let vault = Vault::open_with(&home, &file_keys()).unwrap();
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
    let vault = Vault::open_with(&home, &file_keys()).unwrap();
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
        Err(VaultError::Corrupt { .. })
    ));
    let report = vault.verify().unwrap();
    assert_eq!(report.unreadable, vec!["github/default".to_string()]);
}

#[test]
fn missing_key_file_never_rekeys() {
    let (_d, home) = temp_home();
    Vault::open_with(&home, &file_keys())
        .unwrap()
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    let before = fs::read(home.vault_path()).unwrap();
    fs::remove_file(home.key_file_path()).unwrap();
    for keys in [file_keys(), KeyConfig::default()] {
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
    Vault::open_with(&home, &file_keys())
        .unwrap()
        .put("openai", "default", SECRET, CredentialKind::ApiKey)
        .unwrap();
    fs::remove_file(home.key_file_path()).unwrap();
    keysource::create_key_file(&home.key_file_path(), &[9u8; KEY_LEN]).unwrap();
    let err = Vault::open_with(&home, &file_keys()).unwrap_err();
    assert!(matches!(err, VaultError::WrongKey { .. }), "{err}");
}

#[test]
fn insecure_key_file_is_refused() {
    let (_d, home) = temp_home();
    Vault::open_with(&home, &file_keys()).unwrap();
    fs::set_permissions(home.key_file_path(), fs::Permissions::from_mode(0o644)).unwrap();
    let err = Vault::open_with(&home, &file_keys()).unwrap_err();
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
    let err = Vault::open_with(&home, &file_keys()).unwrap_err();
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
    };
    assert!(matches!(
        Vault::open_with(&home, &keys),
        Err(VaultError::PassphraseMissingForNewVault)
    ));
}

#[test]
fn names_and_secrets_are_checked() {
    let (_d, home) = temp_home();
    let vault = Vault::open_with(&home, &file_keys()).unwrap();
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
    let shared = std::sync::Arc::new(Vault::open_with(&home, &file_keys()).unwrap());
    let handles: Vec<_> = (0..6)
        .map(|t| {
            let shared = shared.clone();
            let home = home.clone();
            std::thread::spawn(move || {
                let own = Vault::open_with(&home, &file_keys()).unwrap();
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
                let v = Vault::open_with(&home, &file_keys()).unwrap();
                v.put("p", &format!("t{t}"), SECRET, CredentialKind::ApiKey)
                    .unwrap();
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    let v = Vault::open_with(&home, &file_keys()).unwrap();
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
    drop(Vault::open_with(&home, &file_keys()).unwrap());
    Connection::open(home.vault_path())
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    assert!(matches!(
        Vault::open_with(&home, &file_keys()),
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
    let vault = vault_with_secret(&home, &file_keys());
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
    let mismatch = reopen_get(&home, &file_keys()).unwrap_err();
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
    assert_eq!(reopen_get(&home, &file_keys()).unwrap(), SECRET);
    let vault = Vault::open_with(&home, &file_keys()).unwrap();
    vault
        .rekey(&home, &file_keys(), KeySource::File, None)
        .unwrap();
    assert_ne!(fs::read(home.key_file_path()).unwrap(), second_key);
    assert!(!pending_key_file(&home).exists());
    assert_eq!(reopen_get(&home, &file_keys()).unwrap(), SECRET);
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
    let vault = vault_with_secret(&home, &file_keys());
    drop(vault);
    let old_key = fs::read(home.key_file_path()).unwrap();
    // What `rekey` does up to its commit.
    let conn = Connection::open(home.vault_path()).unwrap();
    let meta = read_meta(&conn, &home.vault_path()).unwrap().unwrap();
    let data_key = unlock_raw(&home, &home.vault_path(), &meta, &file_keys()).unwrap();
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

    assert_eq!(reopen_get(&home, &file_keys()).unwrap(), SECRET);
    assert!(!pending_key_file(&home).exists(), "renamed into place");
    assert_ne!(fs::read(home.key_file_path()).unwrap(), old_key);
    assert_eq!(reopen_get(&home, &file_keys()).unwrap(), SECRET);
}

#[test]
fn rekey_to_a_keyring_that_cannot_take_the_key_changes_nothing() {
    let (_d, home) = temp_home();
    let vault = vault_with_secret(&home, &file_keys());
    match vault.rekey(&home, &file_keys(), KeySource::Keyring, None) {
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
            assert_eq!(reopen_get(&home, &file_keys()).unwrap(), SECRET);
        }
    }
}
