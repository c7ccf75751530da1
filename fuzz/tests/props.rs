//! The fuzz targets' invariants as property tests: fast, in every test run. `scripts/fuzz`
//! runs the same functions under AFL++ for as long as you like.

use proptest::prelude::*;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// A secret put anywhere in a body, the body cut anywhere: it never comes out.
    #[test]
    fn the_stream_redactor_never_lets_the_secret_out(
        before in "[ -~\n]{0,80}",
        after in "[ -~\n]{0,80}",
        cuts in proptest::collection::vec(any::<u8>(), 0..12),
    ) {
        let mut data = cuts.clone();
        data.retain(|&c| c != b'|');
        data.push(b'|');
        data.extend_from_slice(format!("{before}KEY{after}").as_bytes());
        broker_fuzz::redact_stream(&data);
    }

    /// The same for a WebSocket message, whole or in fragments, cut anywhere on the wire.
    #[test]
    fn the_websocket_redactor_never_lets_the_secret_out(
        frames in proptest::collection::vec((0u8..8, "[ -~]{0,40}"), 1..6),
        key_in in any::<prop::sample::Index>(),
        cuts in proptest::collection::vec(any::<u8>(), 0..12),
    ) {
        let mut data: Vec<u8> = cuts.into_iter().filter(|&c| c != b'|').collect();
        data.push(b'|');
        let with_key = key_in.index(frames.len());
        for (i, (kind, text)) in frames.iter().enumerate() {
            if i > 0 {
                data.push(b'\n');
            }
            data.push(*kind);
            data.extend_from_slice(text.as_bytes());
            if i == with_key {
                data.extend_from_slice(b"KEY");
            }
        }
        broker_fuzz::redact_ws(&data);
    }

    /// Shim config lines of known keys with arbitrary values: what parses round-trips.
    #[test]
    fn shim_configs_round_trip(
        lines in proptest::collection::vec(
            (prop::sample::select(vec!["slot", "port", "port6", "ca", "host", "env", "env-if-set",
                "connect-proxy", "denial-log", "deny-unlisted", "ticket"]), "[ -~]{0,30}"),
            0..12,
        ),
    ) {
        let mut text = String::from("broker-shim-config 1\nslot 3\nport 4000\n");
        for (key, value) in lines {
            text.push_str(&format!("{key} {value}\n"));
        }
        broker_fuzz::shim_config(text.as_bytes());
    }

    /// Request heads with the placeholder in random places: the secret lands only where the
    /// provider's route puts it.
    #[test]
    fn the_swap_puts_the_secret_only_at_injection_points(
        provider in any::<u8>(),
        lines in proptest::collection::vec(
            prop::sample::select(vec!["Bearer PH", "PH", "Basic PH", "token PH", "x PH y",
                "key=PH", "Bearer other", ""]),
            0..6,
        ),
        query in prop::sample::select(vec!["", "key=PH", "a=1&key=PH", "q=PH&key=x"]),
    ) {
        let mut data = vec![provider];
        for line in lines {
            data.extend_from_slice(line.as_bytes());
            data.push(b'\n');
        }
        data.extend_from_slice(query.as_bytes());
        broker_fuzz::swap(&data);
    }

    /// Arbitrary text never makes the provider, control or audit parsers panic.
    #[test]
    fn parsers_take_any_text(text in "\\PC{0,200}") {
        broker_fuzz::provider_toml(text.as_bytes());
        broker_fuzz::control_request(text.as_bytes());
        broker_fuzz::audit_log(text.as_bytes());
    }

    /// Any datagram to the DNS responder: answers made there hold only the run's addresses.
    #[test]
    fn the_dns_responder_answers_only_with_fake_addresses(
        data in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        broker_fuzz::dns_message(&data);
    }

    /// Well-formed queries about managed and other names, of any type, class and flags.
    #[test]
    fn the_dns_responder_answers_queries_with_fake_addresses_only(
        id in any::<u16>(),
        flags in any::<u16>(),
        questions in proptest::collection::vec(
            (
                prop::sample::select(vec![
                    "api.openai.com", "API.OPENAI.COM", "res1.openai.azure.com",
                    "a.b.openai.azure.com", "example.org", "openai.com",
                ]),
                prop_oneof![Just(1u16), Just(28), Just(65), Just(255), any::<u16>()],
                prop::sample::select(vec![1u16, 3, 255, 254]),
            ),
            0..3,
        ),
        tail in proptest::collection::vec(any::<u8>(), 0..16),
    ) {
        let mut data = Vec::new();
        data.extend_from_slice(&id.to_be_bytes());
        data.extend_from_slice(&flags.to_be_bytes());
        data.extend_from_slice(&(questions.len() as u16).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        for (name, qtype, qclass) in &questions {
            for label in name.split('.') {
                data.push(label.len() as u8);
                data.extend_from_slice(label.as_bytes());
            }
            data.push(0);
            data.extend_from_slice(&qtype.to_be_bytes());
            data.extend_from_slice(&qclass.to_be_bytes());
        }
        data.extend_from_slice(&tail);
        broker_fuzz::dns_message(&data);
    }
}
