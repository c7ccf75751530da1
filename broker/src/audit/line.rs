//! The JSON of one audit line, written by hand into the batch's buffer. The audit writer
//! encodes one line per proxied request; serde_json's derive (with the `flatten`ed event, a
//! map serializer) spent about 7,000 instructions on each, this about a fifth of that. The
//! bytes are the same as `serde_json::to_writer(record)`'s for the record with its event
//! `AuditEvent::sanitized` (a test holds it to that), so a log written either way reads and
//! verifies the same.
//!
//! The event comes as an [`EventView`], borrowed: the proxy's request events are written
//! from what the request holds, without making an `AuditEvent`'s strings for each line.

#[cfg(test)]
use super::{AuditRecord, LineEvent as _};
use super::{EventView, MAX_FIELD_LEN};

/// Append a line's JSON up to and including its `prev`, without the closing `}`: fields in
/// `AuditRecord`'s order, `None` fields left out, each string field cut as
/// `AuditEvent::sanitized` cuts it (the path at a query or fragment, long values to
/// [`MAX_FIELD_LEN`] characters and `…`). The caller adds `hash` or `mac`, and the `}`.
pub(super) fn write_open_line(
    seq: u64,
    time: &str,
    event: &EventView<'_>,
    prev: &[u8],
    out: &mut Vec<u8>,
) {
    let EventView {
        event,
        run_id,
        pid,
        command,
        uid,
        provider,
        profile,
        host,
        sni,
        method,
        path,
        status,
        bytes,
        latency_ms,
        reason,
    } = *event;
    out.extend_from_slice(b"{\"seq\":");
    number(out, seq);
    string_field(out, "time", time.as_bytes());
    string_field(out, "event", event.as_str().as_bytes());
    optional_string(out, "run_id", run_id);
    optional_number(out, "pid", pid.map(u64::from));
    optional_string(out, "command", command);
    optional_number(out, "uid", uid.map(u64::from));
    optional_string(out, "provider", provider);
    optional_string(out, "profile", profile);
    optional_string(out, "host", host);
    optional_string(out, "sni", sni);
    optional_string(out, "method", method);
    optional_string(out, "path", path.map(without_query));
    optional_number(out, "status", status.map(u64::from));
    optional_number(out, "bytes", bytes);
    optional_number(out, "latency_ms", latency_ms);
    optional_string(out, "reason", reason);
    string_field(out, "prev", prev);
}

/// Append `record` as serde_json would write it with its event sanitized: the empty
/// `hash`/`mac` left out.
#[cfg(test)]
pub(super) fn write_record(record: &AuditRecord, out: &mut Vec<u8>) {
    write_open_line(
        record.seq,
        &record.time,
        &record.event.view(),
        record.prev.as_bytes(),
        out,
    );
    if !record.hash.is_empty() {
        string_field(out, "hash", record.hash.as_bytes());
    }
    if !record.mac.is_empty() {
        string_field(out, "mac", record.mac.as_bytes());
    }
    out.push(b'}');
}

/// A path without its query string or fragment (the audit keeps neither).
pub(super) fn without_query(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |i| &path[..i])
}

/// Where a free-text value is cut: the byte index after its first [`MAX_FIELD_LEN`]
/// characters, or `None` when it has no more than that.
pub(super) fn cut_at(value: &str) -> Option<usize> {
    // A string has at least as many bytes as chars: most values need no count.
    if value.len() <= MAX_FIELD_LEN {
        return None;
    }
    value.char_indices().nth(MAX_FIELD_LEN).map(|(i, _)| i)
}

#[inline(always)]
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

fn number(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// A field whose value is never cut (the time, the kind, the chain's hex).
#[inline(always)]
fn string_field(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    key(out, name);
    string(out, value, "");
}

/// A free-text field, cut as [`cut_at`] says.
#[inline(always)]
fn optional_string(out: &mut Vec<u8>, name: &str, value: Option<&str>) {
    if let Some(value) = value {
        key(out, name);
        match cut_at(value) {
            None => string(out, value.as_bytes(), ""),
            Some(i) => string(out, &value.as_bytes()[..i], "…"),
        }
    }
}

#[inline(always)]
fn optional_number(out: &mut Vec<u8>, name: &str, value: Option<u64>) {
    if let Some(n) = value {
        key(out, name);
        number(out, n);
    }
}

/// A JSON string with serde_json's escapes: `\"`, `\\`, the five short control escapes, and
/// `\u00XX` (lowercase hex) for the other control characters; everything else as it is.
/// `bytes` are UTF-8 (a `str`'s bytes, or a prefix of them cut at a character's start);
/// `tail`, which needs no escape, follows it inside the quotes.
fn string(out: &mut Vec<u8>, bytes: &[u8], tail: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    // Most values need no escape, and those that do (a command line with quotes) need few:
    // the clean runs between escapes are found eight bytes at a time and copied whole.
    let mut clean_from = 0;
    while let Some(i) = next_escape(bytes, clean_from) {
        out.extend_from_slice(&bytes[clean_from..i]);
        let b = bytes[i];
        let escape: &[u8] = match b {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            _ => b"",
        };
        if escape.is_empty() {
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 0xf)]);
        } else {
            out.extend_from_slice(escape);
        }
        clean_from = i + 1;
    }
    out.extend_from_slice(&bytes[clean_from..]);
    out.extend_from_slice(tail.as_bytes());
    out.push(b'"');
}

/// Does JSON escape this byte (below 0x20, `"`, `\\`)?
fn is_escaped(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

/// The index of the first byte at or after `from` that JSON escapes. Eight bytes at a time:
/// a test per byte cost about 8 instructions a byte, about 4,000 per audit line
/// (`scripts/bench-instructions`, whose command line has quotes in it).
fn next_escape(bytes: &[u8], from: usize) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH_BITS: u64 = 0x8080_8080_8080_8080;
    // Some byte of `v` is below `n` (for n <= 0x80): the subtraction borrows into the high bit
    // of such a byte, and `!v` rules out bytes whose high bit was set already. A borrow can
    // flag the byte above a low one too, but only when a low one is there: the answer to
    // "is there one" stays exact, and the word is then searched a byte at a time.
    let has_below = |v: u64, n: u8| v.wrapping_sub(ONES * u64::from(n)) & !v & HIGH_BITS != 0;
    let rest = bytes.get(from..)?;
    let mut words = rest.chunks_exact(8);
    let mut at = from;
    for word in &mut words {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        let v = u64::from_le_bytes(eight);
        if has_below(v, 0x20)
            || has_below(v ^ (ONES * u64::from(b'"')), 1)
            || has_below(v ^ (ONES * u64::from(b'\\')), 1)
        {
            return word.iter().position(|&b| is_escaped(b)).map(|i| at + i);
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| is_escaped(b))
        .map(|i| at + i)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, EventKind};
    use proptest::prelude::*;

    fn same_as_serde(record: &AuditRecord) {
        let mut ours = Vec::new();
        write_record(record, &mut ours);
        let sanitized = AuditRecord {
            event: record.event.clone().sanitized(),
            ..record.clone()
        };
        let theirs = serde_json::to_vec(&sanitized).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&ours),
            String::from_utf8_lossy(&theirs)
        );
    }

    fn record(event: AuditEvent) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time: "2026-12-04T17:00:00.000Z".into(),
            event,
            prev: crate::audit::GENESIS.into(),
            hash: String::new(),
            mac: String::new(),
        }
    }

    #[test]
    fn every_field_and_every_escape_is_written_as_serde_json_writes_it() {
        let all = "q\"b\\s/n\nr\rt\tb\u{8}f\u{c}nul\u{0}us\u{1f}del\u{7f}é€😀";
        for kind in [EventKind::CredentialUse, EventKind::SniHostMismatch] {
            let mut full = record(AuditEvent {
                run_id: Some(all.into()),
                pid: Some(u32::MAX),
                command: Some(all.into()),
                uid: Some(0),
                provider: Some(all.into()),
                profile: Some(String::new()),
                host: Some(all.into()),
                sni: Some(all.into()),
                method: Some(all.into()),
                path: Some(all.into()),
                status: Some(599),
                bytes: Some(u64::MAX),
                latency_ms: Some(0),
                reason: Some(all.into()),
                ..AuditEvent::new(kind)
            });
            same_as_serde(&full);
            full.seq = u64::MAX;
            full.hash = "ab".into();
            full.mac = "cd".into();
            same_as_serde(&full);
        }
        same_as_serde(&record(AuditEvent::new(EventKind::AuditReset)));
    }

    #[test]
    fn long_values_and_queries_are_cut_as_the_sanitized_event_has_them() {
        // Around the limit, in one-byte and multi-byte characters (cut at a character, never
        // inside one), with escapes before the cut.
        for n in [
            MAX_FIELD_LEN - 1,
            MAX_FIELD_LEN,
            MAX_FIELD_LEN + 1,
            3 * MAX_FIELD_LEN,
        ] {
            for unit in ["a", "é", "€", "😀", "\"q"] {
                let long = unit.repeat(n);
                let event = AuditEvent {
                    run_id: Some(long.clone()),
                    command: Some(long.clone()),
                    provider: Some(long.clone()),
                    profile: Some(long.clone()),
                    host: Some(long.clone()),
                    sni: Some(long.clone()),
                    method: Some(long.clone()),
                    path: Some(format!("/v1/{long}?key=sk-secret#frag")),
                    reason: Some(long.clone()),
                    ..AuditEvent::new(EventKind::Denial)
                };
                same_as_serde(&record(event));
            }
        }
        let mut ours = Vec::new();
        let query = record(AuditEvent {
            path: Some("/v1/models?api_key=sk-secret".into()),
            ..AuditEvent::new(EventKind::CredentialUse)
        });
        write_record(&query, &mut ours);
        let line = String::from_utf8(ours).unwrap();
        assert!(line.contains(r#""path":"/v1/models","#), "{line}");
        assert!(!line.contains("sk-secret"), "{line}");
    }

    proptest! {
        #[test]
        fn eight_bytes_at_a_time_finds_what_a_byte_at_a_time_finds(
            plain in proptest::collection::vec(
                prop_oneof![0x20u8..=0x21, 0x23u8..=0x5b, 0x5du8..=0xff],
                0..40,
            ),
            // At most one byte of interest, anywhere: each must be found alone.
            odd in proptest::option::of(prop_oneof![
                Just(0x00u8), Just(0x01), Just(0x1f), Just(0x20), Just(b'"'), Just(b'\\'),
                Just(0x21), Just(0x5b), Just(0x5d), Just(0x7f), Just(0x80), Just(0xff),
            ]),
            at in any::<usize>(),
        ) {
            let mut bytes = plain;
            if let Some(b) = odd {
                let at = at % (bytes.len() + 1);
                bytes.insert(at, b);
            }
            let naive = bytes.iter().position(|&b| b < 0x20 || b == b'"' || b == b'\\');
            prop_assert_eq!(next_escape(&bytes, 0), naive);
            // And from any start.
            let from = at % (bytes.len() + 1);
            let naive = bytes[from..]
                .iter()
                .position(|&b| b < 0x20 || b == b'"' || b == b'\\')
                .map(|i| from + i);
            prop_assert_eq!(next_escape(&bytes, from), naive);
        }

        #[test]
        fn any_text_is_written_as_serde_json_writes_it(
            text in any::<String>(),
            number in any::<u64>(),
            small in any::<u32>(),
        ) {
            let mut r = record(AuditEvent {
                command: Some(text.clone()),
                path: Some(text.clone()),
                pid: Some(small),
                bytes: Some(number),
                ..AuditEvent::new(EventKind::Denial)
            });
            r.seq = number;
            r.time = text;
            same_as_serde(&r);
        }
    }
}
