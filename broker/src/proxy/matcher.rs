//! Finding a form of the secret however an echo escaped it: a small normalising matcher.
//!
//! An upstream that echoes the key may percent-encode any subset of its bytes (`sk%2Dab`,
//! `%73%6B...`), escape them as JSON `\u00XX` (or `\/`, `\\`, `\"`), and break base64 across
//! lines (MIME at 76 characters, PEM at 64). A fixed string per combination would take
//! exponentially many; instead each needle is compared against the text decoded on the fly:
//! at every position, an escape counts as the byte it stands for, and one line break (`\n` or
//! `\r\n`) may sit between any two bytes of the needle. Where an escape could be read either
//! way (`%25` is `%`, and `%` is also itself) both readings are tried.
//!
//! Candidates are found the way the fixed-string search found them: memchr for the needle's
//! first byte, plus the positions of `%` and `\` (where an escaped first byte would start),
//! so text without those bytes costs what it did. In a stream, the longest tail that could
//! still begin an occurrence is held back; an occurrence is at most [`MAX_UNIT`] bytes per
//! needle byte long, which bounds how far back that tail can start.

/// The longest a needle byte can be in the text: `\u00XX` (6) after a `\r\n` (2).
pub const MAX_UNIT: usize = 8;

/// How a needle is compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode {
    /// Escapes count as the bytes they stand for, and a line break may sit between two bytes.
    pub decode: bool,
    /// Letters compare whatever their case (hex: `7A`, `7a`); the needle is lowercase.
    pub fold_case: bool,
}

impl Mode {
    /// The bytes as they are.
    #[cfg(test)]
    pub const EXACT: Mode = Mode {
        decode: false,
        fold_case: false,
    };

    fn same(self, got: u8, want: u8) -> bool {
        got == want || (self.fold_case && got.to_ascii_lowercase() == want)
    }
}

/// How a needle compares with the text at some position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The whole needle, ending before this index.
    Match(usize),
    /// Consistent up to the end of the text: more text could complete it.
    Partial,
    Mismatch,
}

/// A set of byte values.
#[derive(Debug, Clone)]
pub struct ByteSet([bool; 256]);

impl ByteSet {
    pub fn of(bytes: impl IntoIterator<Item = u8>) -> ByteSet {
        let mut set = [false; 256];
        for b in bytes {
            set[usize::from(b)] = true;
        }
        ByteSet(set)
    }

    fn has(&self, b: u8) -> bool {
        self.0[usize::from(b)]
    }
}

/// A complete escape in the text: where it starts and the byte it stands for.
pub type Escape = (usize, u8);

/// The complete escapes in `hay` that stand for a byte in `firsts` (the needles' first
/// bytes): only those can start an escaped occurrence. Most escapes in JSON text (`\n`, `\"`)
/// stand for bytes no needle starts with; dropped here, they are not tried against each needle.
/// They are found by what they start with: `%`, and `\u00` (a substring search, which steps
/// over the `\n` and `\"` that fill JSON text); the short escapes `\/`, `\\`, `\"` only
/// where a needle starts with the byte they stand for.
pub fn escapes(hay: &[u8], firsts: &ByteSet) -> Vec<Escape> {
    static UNICODE: std::sync::OnceLock<memchr::memmem::Finder<'static>> =
        std::sync::OnceLock::new();
    if memchr::memchr2(b'%', b'\\', hay).is_none() {
        return Vec::new();
    }
    let unicode = UNICODE.get_or_init(|| memchr::memmem::Finder::new(b"\\u00"));
    let keep = |at: usize| match escape_at(hay, at) {
        Some(Ok((byte, _))) if firsts.has(byte) => Some((at, byte)),
        _ => None,
    };
    let mut out: Vec<Escape> = memchr::memchr_iter(b'%', hay).filter_map(keep).collect();
    let percent = out.len();
    if firsts.has(b'/') || firsts.has(b'\\') || firsts.has(b'"') {
        out.extend(memchr::memchr_iter(b'\\', hay).filter_map(keep));
    } else {
        out.extend(unicode.find_iter(hay).filter_map(keep));
    }
    if percent > 0 && out.len() > percent {
        out.sort_unstable();
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The escape starting at `at` (`%XX`, `\u00XX`, `\/`, `\\`, `\"`): `Some(Ok((byte, len)))`,
/// `Some(Err(()))` if the text ends inside what could still become one, `None` if it is none.
fn escape_at(hay: &[u8], at: usize) -> Option<Result<(u8, usize), ()>> {
    let rest = &hay[at..];
    // The shape each escape must have; `h` is a hex digit.
    let shape: &[u8] = match rest.first()? {
        b'%' => b"%hh",
        b'\\' => match rest.get(1) {
            None => return Some(Err(())),
            Some(b'/') => return Some(Ok((b'/', 2))),
            Some(b'\\') => return Some(Ok((b'\\', 2))),
            Some(b'"') => return Some(Ok((b'"', 2))),
            Some(b'u') => b"\\u00hh",
            Some(_) => return None,
        },
        _ => return None,
    };
    for (i, &want) in shape.iter().enumerate() {
        let Some(&got) = rest.get(i) else {
            return Some(Err(()));
        };
        let fits = match want {
            b'h' => hex(got).is_some(),
            _ => got == want,
        };
        if !fits {
            return None;
        }
    }
    let n = shape.len();
    let value = hex(rest[n - 2]).unwrap_or(0) << 4 | hex(rest[n - 1]).unwrap_or(0);
    Some(Ok((value, n)))
}

/// Compare `needle` with `hay` from `at`. With `decode` off only the bytes as they are count.
pub fn match_at(hay: &[u8], at: usize, needle: &[u8], mode: Mode) -> Outcome {
    match_from(hay, at, needle, 0, mode)
}

/// Bytes the decoding may read as something other than themselves.
fn special(b: u8) -> bool {
    matches!(b, b'%' | b'\\' | b'\r' | b'\n')
}

fn match_from(hay: &[u8], mut at: usize, needle: &[u8], mut k: usize, mode: Mode) -> Outcome {
    while k < needle.len() {
        // The common cases first, without decoding: the same plain byte, or a plain byte that
        // differs (nearly every candidate ends there).
        let Some(&got) = hay.get(at) else {
            return Outcome::Partial;
        };
        if !mode.decode || !special(got) {
            if !mode.same(got, needle[k]) {
                return Outcome::Mismatch;
            }
            at += 1;
            k += 1;
            continue;
        }
        if k > 0 {
            // One line break may sit between two bytes of the needle (wrapped base64).
            match &hay[at..] {
                [b'\r'] => return Outcome::Partial,
                [b'\r', b'\n', ..] => at += 2,
                [b'\n', ..] => at += 1,
                _ => {}
            }
        }
        let Some(&got) = hay.get(at) else {
            return Outcome::Partial;
        };
        let want = needle[k];
        match escape_at(hay, at) {
            None if mode.same(got, want) => {
                at += 1;
                k += 1;
            }
            None => return Outcome::Mismatch,
            Some(Err(())) => return Outcome::Partial,
            Some(Ok((byte, len))) => {
                // Both readings: the escape as the byte it stands for, and its first
                // character as itself (a `%` in the secret).
                let literal = match got == want {
                    true => match_from(hay, at + 1, needle, k + 1, mode),
                    false => Outcome::Mismatch,
                };
                if !mode.same(byte, want) {
                    return literal;
                }
                return match (match_from(hay, at + len, needle, k + 1, mode), literal) {
                    (m @ Outcome::Match(_), _) | (_, m @ Outcome::Match(_)) => m,
                    (Outcome::Partial, _) | (_, Outcome::Partial) => Outcome::Partial,
                    _ => Outcome::Mismatch,
                };
            }
        }
    }
    Outcome::Match(at)
}

/// Candidate starts at or after `from`, in order: where the needle's first byte is (in
/// either case when folding), and where an escape standing for it is.
fn candidates<'a>(
    hay: &'a [u8],
    first: u8,
    mode: Mode,
    escapes: &'a [Escape],
    from: usize,
) -> impl Iterator<Item = usize> + 'a {
    let rest = hay.get(from..).unwrap_or(&[]);
    let upper = first.to_ascii_uppercase();
    let mut one = None;
    let mut two = None;
    match mode.fold_case && upper != first {
        true => two = Some(memchr::memchr2_iter(first, upper, rest)),
        false => one = Some(memchr::memchr_iter(first, rest)),
    }
    let mut literal = std::iter::from_fn(move || match (&mut one, &mut two) {
        (Some(it), _) => it.next(),
        (_, Some(it)) => it.next(),
        _ => None,
    })
    .map(move |i| i + from)
    .peekable();
    let mut escaped = escapes[escapes.partition_point(|&(e, _)| e < from)..]
        .iter()
        .filter(move |&&(_, byte)| mode.same(byte, first))
        .map(|&(at, _)| at)
        .peekable();
    std::iter::from_fn(move || match (literal.peek(), escaped.peek()) {
        (Some(&l), Some(&e)) if l == e => {
            escaped.next();
            literal.next()
        }
        (Some(&l), Some(&e)) if e < l => escaped.next(),
        (Some(_), _) => literal.next(),
        (None, _) => escaped.next(),
    })
}

/// The next occurrence of `needle` at or after `from`: its start and end.
pub fn next_match(
    hay: &[u8],
    needle: &[u8],
    from: usize,
    mode: Mode,
    escapes: &[Escape],
) -> Option<(usize, usize)> {
    let &first = needle.first()?;
    let escapes = if mode.decode { escapes } else { &[] };
    candidates(hay, first, mode, escapes, from).find_map(|at| {
        match match_at(hay, at, needle, mode) {
            Outcome::Match(end) => Some((at, end)),
            _ => None,
        }
    })
}

/// The length of the longest tail of `hay` that could begin an occurrence of `needle`.
pub fn partial_len(hay: &[u8], needle: &[u8], mode: Mode) -> usize {
    let Some(&first) = needle.first() else {
        return 0;
    };
    let window = match mode.decode {
        true => needle.len() * MAX_UNIT,
        false => needle.len() - 1,
    };
    let start = hay.len().saturating_sub(window);
    let tail = &hay[start..];
    // Here an escape cut by the end of the text counts too: it may become the first byte.
    let escapes: Vec<Escape> = match mode.decode && memchr::memchr2(b'%', b'\\', tail).is_some() {
        true => memchr::memchr2_iter(b'%', b'\\', tail)
            .filter_map(|at| match escape_at(tail, at) {
                Some(Ok((byte, _))) if mode.same(byte, first) => Some((at, byte)),
                Some(Err(())) => Some((at, first)),
                _ => None,
            })
            .collect(),
        false => Vec::new(),
    };
    // The earliest candidate that is still consistent gives the longest tail.
    let earliest = candidates(tail, first, mode, &escapes, 0)
        .find(|&at| match_at(tail, at, needle, mode) == Outcome::Partial);
    earliest.map_or(0, |at| tail.len() - at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(hay: &str, needle: &str) -> Option<(usize, usize)> {
        let firsts = ByteSet::of(needle.bytes().take(1));
        next_match(
            hay.as_bytes(),
            needle.as_bytes(),
            0,
            Mode {
                decode: true,
                fold_case: false,
            },
            &escapes(hay.as_bytes(), &firsts),
        )
    }

    #[test]
    fn escapes_count_as_their_bytes() {
        assert_eq!(found("x sk%2Dab%63 y", "sk-abc"), Some((2, 12)));
        assert_eq!(found("x %73%6b%2d%61%62%63", "sk-abc"), Some((2, 20)));
        assert_eq!(found(r#""\u0073k\/abc""#, "sk/abc"), Some((1, 13)));
        assert_eq!(found("sk-a\r\nbc", "sk-abc"), Some((0, 8)));
        assert_eq!(
            found("sk-a\n\nbc", "sk-abc"),
            None,
            "one line break, not two"
        );
        assert_eq!(found("sk%2", "sk-abc"), None);
    }

    #[test]
    fn a_percent_in_the_secret_is_read_both_ways() {
        assert_eq!(found("a%41b", "a%41b"), Some((0, 5)));
        assert_eq!(found("a%2541b", "a%41b"), Some((0, 7)));
        assert_eq!(found("aAb", "a%41b"), None);
    }

    #[test]
    fn the_tail_that_could_begin_a_form_is_held() {
        let decode = Mode {
            decode: true,
            fold_case: false,
        };
        let partial = |hay: &str| partial_len(hay.as_bytes(), b"sk-abc", decode);
        assert_eq!(partial("hello sk"), 2);
        assert_eq!(partial("hello sk%2"), 4);
        assert_eq!(partial("hello \\u007"), 5);
        assert_eq!(partial("hello sk-a\r"), 5);
        assert_eq!(partial("hello sk-a\n"), 5);
        assert_eq!(partial("hello sk-x"), 0);
        assert_eq!(partial("hello %zz"), 0);
        assert_eq!(partial_len(b"hello sk%2", b"sk-abc", Mode::EXACT), 0);
    }
}
