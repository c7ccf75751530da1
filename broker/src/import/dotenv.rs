//! The assignments of a `.env` file (or a shell rc file), with the byte range of each value,
//! so a key can be replaced by its placeholder and every other byte kept: comments, blank
//! lines, order, `export ` prefixes, quoting style, spacing around `=`, CRLF line ends.
//!
//! The grammar is the common subset of python-dotenv, dotenv (node), docker compose and
//! POSIX shells: `[export] NAME=value`, the value unquoted (up to a ` #` comment or the end
//! of the line), in single quotes, double quotes or backticks (which may span lines). A value
//! that needs interpretation (a double-quoted value with backslash escapes, a `$` reference,
//! several lines) is reported as such and never rewritten: a key is one line of plain
//! characters, so nothing real is missed.

use std::ops::Range;

/// One `NAME=value` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// 1-based line of the name.
    pub line: usize,
    pub name: String,
    /// The value as written between the quotes (or unquoted, trimmed).
    pub value: String,
    /// Where `value` is in the text: replacing this range replaces the value and nothing else.
    pub value_span: Range<usize>,
    /// The value is exactly its text: no escapes, no references, one line.
    pub literal: bool,
}

/// Every assignment of `text`, in order. Lines that are not assignments are skipped.
pub fn assignments(text: &str) -> Vec<Assignment> {
    let bytes = text.as_bytes();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut line = 1;
    while pos < bytes.len() {
        let line_end = memchr::memchr(b'\n', &bytes[pos..]).map_or(bytes.len(), |i| pos + i);
        let mut next = (line_end + 1).min(bytes.len());
        let Ok(found) = assignment_at(text, pos, line_end, line) else {
            // `NAME="...` never closed: the rest of the file is that value.
            break;
        };
        if let Some(found) = found {
            // A quoted value may run past this line: continue after its closing quote's line.
            if found.value_span.end > line_end {
                let close = found.value_span.end;
                next =
                    memchr::memchr(b'\n', &bytes[close..]).map_or(bytes.len(), |i| close + i + 1);
            }
            out.push(found);
        }
        line += text[pos..next].matches('\n').count();
        pos = next;
    }
    out
}

/// The assignment on the line `text[start..line_end]`, if it is one; `Err` for one whose
/// quoted value is never closed.
fn assignment_at(
    text: &str,
    start: usize,
    line_end: usize,
    line: usize,
) -> Result<Option<Assignment>, Unterminated> {
    let bytes = text.as_bytes();
    let mut i = skip_blanks(bytes, start, line_end);
    if text[i..line_end].starts_with("export") {
        let after = i + "export".len();
        if matches!(bytes.get(after), Some(b' ' | b'\t')) {
            i = skip_blanks(bytes, after, line_end);
        }
    }
    let name_start = i;
    if !bytes
        .get(i)
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_')
    {
        return Ok(None);
    }
    while i < line_end && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'_' | b'.')) {
        i += 1;
    }
    let name = &text[name_start..i];
    i = skip_blanks(bytes, i, line_end);
    if bytes.get(i) != Some(&b'=') || i >= line_end {
        return Ok(None);
    }
    i = skip_blanks(bytes, i + 1, line_end);
    let (value_span, quoted) = match bytes.get(i) {
        Some(&q @ (b'\'' | b'"' | b'`')) if i < line_end => {
            let close = closing_quote(bytes, i + 1, q).ok_or(Unterminated)?;
            (i + 1..close, Some(q))
        }
        _ => (i..unquoted_end(bytes, i, line_end), None),
    };
    let value = &text[value_span.clone()];
    let multiline = value.contains('\n');
    let escaped = quoted == Some(b'"') && value.contains('\\');
    let reference = quoted != Some(b'\'') && value.contains('$');
    Ok(Some(Assignment {
        line,
        name: name.to_string(),
        value: value.to_string(),
        value_span,
        literal: !multiline && !escaped && !reference,
    }))
}

/// A quoted value that is never closed.
struct Unterminated;

fn skip_blanks(bytes: &[u8], mut i: usize, end: usize) -> usize {
    while i < end && matches!(bytes[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// The closing `quote` at or after `from` (a double quote may be escaped with a backslash).
fn closing_quote(bytes: &[u8], from: usize, quote: u8) -> Option<usize> {
    let mut i = from;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quote == b'"' => i += 2,
            b if b == quote => return Some(i),
            _ => i += 1,
        }
    }
    None
}

/// An unquoted value ends at the line's end (before a `\r`) or at a ` #` comment, trimmed.
fn unquoted_end(bytes: &[u8], start: usize, line_end: usize) -> usize {
    let mut end = line_end;
    for i in start..line_end {
        if bytes[i] == b'#' && (i == start || matches!(bytes[i - 1], b' ' | b'\t')) {
            end = i;
            break;
        }
    }
    while end > start && matches!(bytes[end - 1], b' ' | b'\t' | b'\r') {
        end -= 1;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names_and_values(text: &str) -> Vec<(usize, String, String, bool)> {
        assignments(text)
            .into_iter()
            .map(|a| {
                assert_eq!(&text[a.value_span.clone()], a.value);
                (a.line, a.name, a.value, a.literal)
            })
            .collect()
    }

    #[test]
    fn the_forms_people_write() {
        let text = "# comment\r\nA=1\r\nexport B = 'two words' # note\n  C=\"three\"\nD=x # c\nE=\nF=`six`\nG=a#b\n";
        let got = names_and_values(text);
        let want = [
            (2, "A", "1"),
            (3, "B", "two words"),
            (4, "C", "three"),
            (5, "D", "x"),
            (6, "E", ""),
            (7, "F", "six"),
            (8, "G", "a#b"),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, w) in got.iter().zip(want) {
            assert_eq!((g.0, g.1.as_str(), g.2.as_str()), w);
            assert!(g.3);
        }
    }

    #[test]
    fn multiline_escaped_and_references_are_not_literals() {
        let text = "K=\"line1\nline2\"\nL=after\nM=\"a\\nb\"\nN=${OTHER}\nO='$kept'\n";
        let got = names_and_values(text);
        assert_eq!(got[0].1, "K");
        assert!(!got[0].3);
        assert_eq!((got[1].0, got[1].1.as_str(), got[1].3), (3, "L", true));
        assert!(!got[2].3);
        assert!(!got[3].3);
        assert!(got[4].3, "single quotes take $ literally");
    }

    #[test]
    fn not_assignments() {
        assert!(assignments("just text\n=value\n1X=2\nexport\n").is_empty());
        // A shell line with a quote after an `=` that is not an assignment is skipped.
        let got = names_and_values("alias ll='ls -l'\nexport K=v\n");
        assert_eq!(got.len(), 1, "{got:?}");
        // An unterminated quote swallows the rest: nothing after it is taken for a line.
        let got = names_and_values("A='open\nB=2\n");
        assert!(got.is_empty(), "{got:?}");
        assert_eq!(names_and_values("X=1").len(), 1, "no final newline");
    }
}
