//! The normalised path that method/path rules are matched against, and that the broker then
//! sends upstream in place of the agent's (so what was checked is what is sent: no second
//! reading of the path by the upstream can differ from the broker's).
//!
//! The definition, step by step (README, "Policy", says the same):
//! 1. The path must start with `/` (`*` and absolute-form leftovers are refused). A raw `\`
//!    anyhow is refused: some servers read it as `/`.
//! 2. It is cut into segments at `/`. In each segment, everything from the first `;` on is
//!    dropped (path parameters: `..;x` is `..`, the bypass published against a peer's rules).
//! 3. Percent-escapes must be well formed (`%` and two hex digits). An escape of an unreserved
//!    character (`A-Z a-z 0-9 - . _ ~`) is decoded (`%2e` is `.`, `%61` is `a`); every other
//!    escape is kept, its hex digits upper-cased (`%2f` -> `%2F`).
//! 4. Refused, because servers disagree on them: an encoded `/` or `\` (`%2F`, `%5C`; a
//!    provider whose API needs them, GitLab's `projects/group%2Fname`, sets
//!    `encoded_slashes = true`, and then the pieces between them must not be dot segments), an
//!    encoded `;` (`%3B`), and a double-encoded dot, slash, backslash or `;` (`%252e`, ...).
//! 5. Trailing dots are dropped from a segment (`admin.` is `admin`, as Windows servers read
//!    it); a segment of three or more dots is refused.
//! 6. Dot segments are resolved (`.` dropped, `..` removes the segment before it); a `..`
//!    above the root is refused rather than clamped. Empty segments (`//`) are dropped; a
//!    trailing `/` (or a trailing dot segment) leaves the path ending in `/`.
//!
//! Case is kept: paths are case-sensitive (RFC 3986), and since rules only ever allow, a
//! server that ignores case can only make the broker refuse more, never allow more.

use std::borrow::Cow;

/// Why a path is refused outright (it has no normal form the broker is willing to vouch for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    NotAbsolute,
    Backslash,
    BadEscape,
    EncodedSlash,
    EncodedSemicolon,
    DoubleEncoded,
    DotsOnly,
    AboveRoot,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::NotAbsolute => "the path does not start with '/'",
            Refused::Backslash => "the path holds a '\\'",
            Refused::BadEscape => "the path holds a '%' that is not a percent-escape",
            Refused::EncodedSlash => {
                "the path holds an encoded '/' or '\\' (%2F, %5C); set encoded_slashes = true for the provider if its API needs them"
            }
            Refused::EncodedSemicolon => "the path holds an encoded ';' (%3B)",
            Refused::DoubleEncoded => {
                "the path holds a double-encoded '.', '/', '\\' or ';' (%25 and its escape)"
            }
            Refused::DotsOnly => "the path holds a segment of three or more dots",
            Refused::AboveRoot => "the path climbs above '/' with '..'",
        }
    }
}

/// The normal form of `path` (see the module docs), or why there is none. Borrowed when
/// `path` is already in normal form (most requests: no escape, no `;`, no dot segment), so the
/// common case allocates nothing.
pub fn normalize(path: &str, encoded_slashes: bool) -> Result<Cow<'_, str>, Refused> {
    if already_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    normalize_slowly(path, encoded_slashes).map(Cow::Owned)
}

/// True when no step of the definition would change `path` (and none would refuse it).
fn already_normal(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    if path.bytes().any(|b| matches!(b, b'%' | b';' | b'\\')) {
        return false;
    }
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment.ends_with('.') {
            return false;
        }
    }
    true
}

fn normalize_slowly(path: &str, encoded_slashes: bool) -> Result<String, Refused> {
    let rest = path.strip_prefix('/').ok_or(Refused::NotAbsolute)?;
    if path.contains('\\') {
        return Err(Refused::Backslash);
    }
    let mut out: Vec<String> = Vec::new();
    let mut trailing_slash = rest.is_empty();
    for raw in rest.split('/') {
        let raw = raw.split(';').next().unwrap_or("");
        let segment = decode_unreserved(raw, encoded_slashes)?;
        trailing_slash = false;
        match segment.as_str() {
            "" => trailing_slash = true,
            "." => trailing_slash = true,
            ".." => {
                out.pop().ok_or(Refused::AboveRoot)?;
                trailing_slash = true;
            }
            _ if segment.bytes().all(|b| b == b'.') => return Err(Refused::DotsOnly),
            _ => out.push(segment.trim_end_matches('.').to_string()),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for segment in &out {
        normal.push('/');
        normal.push_str(segment);
    }
    if trailing_slash || out.is_empty() {
        normal.push('/');
    }
    Ok(normal)
}

/// One segment with unreserved escapes decoded and the others upper-cased; refuses the
/// escapes of step 4.
fn decode_unreserved(raw: &str, encoded_slashes: bool) -> Result<String, Refused> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b != b'%' {
            // Whole characters: a multi-byte one is copied with its first byte.
            let ch = raw[i..].chars().next().unwrap_or('\u{fffd}');
            out.push(ch);
            i += ch.len_utf8();
            continue;
        }
        let value = escape_at(bytes, i).ok_or(Refused::BadEscape)?;
        match value {
            b'/' | b'\\' if !encoded_slashes => return Err(Refused::EncodedSlash),
            b';' => return Err(Refused::EncodedSemicolon),
            b'%' => out.push_str("%25"),
            v if is_unreserved(v) => out.push(char::from(v)),
            v => {
                out.push('%');
                out.push(char::from(HEX[usize::from(v >> 4)]));
                out.push(char::from(HEX[usize::from(v & 15)]));
            }
        }
        i += 3;
    }
    // `%25` then an escape of something that matters (`%252e`, also when its digits were
    // themselves escaped, `%25%32%65`): `%2e` to a server that decodes once more.
    let mut at = 0;
    while let Some(found) = out[at..].find("%25") {
        let after = at + found + 3;
        let twice = out
            .get(after..after + 2)
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        if matches!(twice, Some(b'.' | b'/' | b'\\' | b';' | b'%')) {
            return Err(Refused::DoubleEncoded);
        }
        at = after;
    }
    if encoded_slashes && (out.contains("%2F") || out.contains("%5C")) {
        // The pieces a server that decodes them would see must not climb.
        let dotted = out
            .split("%2F")
            .flat_map(|p| p.split("%5C"))
            .any(|piece| !piece.is_empty() && piece.bytes().all(|b| b == b'.'));
        if dotted {
            return Err(Refused::DotsOnly);
        }
    }
    Ok(out)
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// The byte that the escape `%XX` at `at` encodes.
fn escape_at(bytes: &[u8], at: usize) -> Option<u8> {
    if bytes.get(at) != Some(&b'%') {
        return None;
    }
    let hi = (*bytes.get(at + 1)? as char).to_digit(16)?;
    let lo = (*bytes.get(at + 2)? as char).to_digit(16)?;
    u8::try_from(hi * 16 + lo).ok()
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> Result<String, Refused> {
        normalize(path, false).map(Cow::into_owned)
    }

    /// Each trick, and what it becomes (or why it is refused).
    #[test]
    fn the_definition_case_by_case() {
        let table: &[(&str, Result<&str, Refused>)] = &[
            ("/v1/models", Ok("/v1/models")),
            ("/", Ok("/")),
            ("/v1/models/", Ok("/v1/models/")),
            ("//v1///models", Ok("/v1/models")),
            ("/v1/./models", Ok("/v1/models")),
            ("/v1/x/../models", Ok("/v1/models")),
            ("/v1/models/..", Ok("/v1/")),
            ("/v1/models/.", Ok("/v1/models/")),
            ("/v1/%2e%2e/admin", Ok("/admin")),
            ("/v1/.%2E/admin", Ok("/admin")),
            ("/v1/%2E/models", Ok("/v1/models")),
            ("/v1/models;/../admin", Ok("/v1/admin")),
            ("/v1/admin/..;/models", Ok("/v1/models")),
            ("/v1/admin;x=1/", Ok("/v1/admin/")),
            ("/v1/models/..;jsessionid=x/admin", Ok("/v1/admin")),
            ("/v1/.;/models", Ok("/v1/models")),
            ("/v1/m%6fdels", Ok("/v1/models")),
            ("/v1/a%7e", Ok("/v1/a~")),
            ("/v1/a%3a", Ok("/v1/a%3A")),
            ("/v1/a%20b", Ok("/v1/a%20b")),
            ("/v1/admin.", Ok("/v1/admin")),
            ("/v1/admin..", Ok("/v1/admin")),
            ("/v1/models%2E", Ok("/v1/models")),
            ("/V1/Models", Ok("/V1/Models")),
            ("/v1/..%2Fadmin", Err(Refused::EncodedSlash)),
            ("/v1/a%2fb", Err(Refused::EncodedSlash)),
            ("/v1/a%5cb", Err(Refused::EncodedSlash)),
            ("/v1\\..\\admin", Err(Refused::Backslash)),
            ("/v1/a%3Bb", Err(Refused::EncodedSemicolon)),
            ("/v1/%252e%252e/admin", Err(Refused::DoubleEncoded)),
            ("/v1/%252fadmin", Err(Refused::DoubleEncoded)),
            ("/v1/%25", Ok("/v1/%25")),
            ("/v1/%zz", Err(Refused::BadEscape)),
            ("/v1/%2", Err(Refused::BadEscape)),
            ("/v1/...", Err(Refused::DotsOnly)),
            ("/v1/.%2e.", Err(Refused::DotsOnly)),
            ("/..", Err(Refused::AboveRoot)),
            ("/v1/../../admin", Err(Refused::AboveRoot)),
            ("*", Err(Refused::NotAbsolute)),
            ("", Err(Refused::NotAbsolute)),
        ];
        for (path, want) in table {
            let got = n(path);
            assert_eq!(got.as_deref().map_err(|e| *e), *want, "{path}");
        }
    }

    #[test]
    fn encoded_slashes_when_the_provider_needs_them() {
        let ok = |p| normalize(p, true);
        assert_eq!(
            ok("/api/v4/projects/group%2fname").as_deref(),
            Ok("/api/v4/projects/group%2Fname")
        );
        assert_eq!(ok("/api/x/..%2Fadmin"), Err(Refused::DotsOnly));
        assert_eq!(ok("/api/x/%2e%2e%5Cadmin"), Err(Refused::DotsOnly));
    }

    mod props {
        use super::super::*;
        use proptest::prelude::*;

        fn piece() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("/".to_string()),
                Just(".".to_string()),
                Just("..".to_string()),
                Just(";".to_string()),
                Just("%2e".to_string()),
                Just("%2E".to_string()),
                Just("%2f".to_string()),
                Just("%25".to_string()),
                Just("%5c".to_string()),
                Just("%3b".to_string()),
                Just("%41".to_string()),
                Just("%7E".to_string()),
                Just("%".to_string()),
                "[a-zA-Z0-9_~-]{1,4}",
            ]
        }

        fn path() -> impl Strategy<Value = String> {
            proptest::collection::vec(piece(), 0..16).prop_map(|p| format!("/{}", p.concat()))
        }

        proptest! {
            /// The normal form is a fixed point: normalising it again changes nothing (so
            /// the path the upstream gets reads the same to the broker).
            #[test]
            fn normalising_twice_changes_nothing(p in path(), slashes in any::<bool>()) {
                if let Ok(once) = normalize(&p, slashes) {
                    prop_assert_eq!(normalize(&once, slashes), Ok(once.clone()));
                }
            }

            /// A normal form holds no dot segment, no empty segment but a trailing one, no
            /// parameter, no escape of an unreserved character, and no lower-case escape.
            #[test]
            fn normal_forms_hold_nothing_a_server_could_read_otherwise(p in path()) {
                if let Ok(normal) = normalize(&p, false) {
                    prop_assert!(normal.starts_with('/'));
                    prop_assert!(!normal.contains(';'));
                    prop_assert!(!normal.contains('\\'));
                    let segments: Vec<&str> = normal[1..].split('/').collect();
                    for (i, s) in segments.iter().enumerate() {
                        prop_assert!(*s != "." && *s != "..", "{normal}");
                        prop_assert!(!s.is_empty() || i + 1 == segments.len(), "{normal}");
                        prop_assert!(!s.ends_with('.'), "{normal}");
                    }
                    let lower = normal.to_ascii_lowercase();
                    for bad in ["%2e", "%2f", "%5c", "%3b", "%41", "%7e"] {
                        prop_assert!(!lower.contains(bad), "{normal}");
                    }
                    prop_assert!(!normal.contains("%2e") && !normal.contains("%7e"));
                }
            }

            /// The shortcut for paths already in normal form agrees with the definition.
            #[test]
            fn the_shortcut_agrees_with_the_definition(p in path()) {
                if already_normal(&p) {
                    prop_assert_eq!(normalize_slowly(&p, false), Ok(p.clone()));
                }
            }

            /// Nothing panics on any input.
            #[test]
            fn any_text_normalises_or_is_refused(p in ".{0,40}") {
                let _ = normalize(&p, false);
                let _ = normalize(&p, true);
            }
        }
    }
}
