//! A JSON reader that remembers where each value is in the text, so `broker import mcp` can
//! change one string and leave every other byte of a config as it was.
//!
//! serde_json would re-serialise the whole file: its key order (without its `preserve_order`
//! feature, which the workspace does not enable and which would change every other command's
//! JSON output), its indentation and its escapes would replace the user's, and `~/.claude.json`
//! holds far more than MCP servers. Editing spans keeps comments, spacing, key order and
//! number spellings untouched. It also accepts what VS Code's `mcp.json` may contain (JSONC:
//! `//` and `/* */` comments, trailing commas) and a UTF-8 byte order mark.
//!
//! String values are decoded with serde_json (its escape handling), and new strings are
//! encoded with it.

use std::ops::Range;

/// A parsed value with its byte range in the text.
#[derive(Debug, Clone)]
pub enum Node {
    Object {
        span: Range<usize>,
        members: Vec<Member>,
    },
    Array {
        span: Range<usize>,
        items: Vec<Node>,
    },
    String {
        span: Range<usize>,
        value: String,
    },
    /// A number, `true`, `false` or `null`.
    Scalar {
        span: Range<usize>,
    },
}

/// One `"key": value` of an object.
#[derive(Debug, Clone)]
pub struct Member {
    pub key: String,
    /// The key's quoted text, quotes included.
    pub key_span: Range<usize>,
    pub value: Node,
}

impl Node {
    pub fn span(&self) -> Range<usize> {
        match self {
            Node::Object { span, .. }
            | Node::Array { span, .. }
            | Node::String { span, .. }
            | Node::Scalar { span } => span.clone(),
        }
    }

    /// The value of `key`, when this is an object that has it (the last one, as JSON.parse).
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.member(key).map(|m| &m.value)
    }

    pub fn member(&self, key: &str) -> Option<&Member> {
        match self {
            Node::Object { members, .. } => members.iter().rev().find(|m| m.key == key),
            _ => None,
        }
    }

    pub fn members(&self) -> &[Member] {
        match self {
            Node::Object { members, .. } => members,
            _ => &[],
        }
    }

    pub fn items(&self) -> &[Node] {
        match self {
            Node::Array { items, .. } => items,
            _ => &[],
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::String { value, .. } => Some(value),
            _ => None,
        }
    }
}

/// Where and why a file is not JSON: 1-based line and column. Never quotes the text (it may
/// hold a secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub column: usize,
    pub message: &'static str,
}

/// Deeper nesting than any config has; keeps a hostile file from exhausting the stack.
const MAX_DEPTH: usize = 128;

pub fn parse(text: &str) -> Result<Node, ParseError> {
    let mut p = Parser { text, at: 0 };
    if text.starts_with('\u{feff}') {
        p.at = '\u{feff}'.len_utf8();
    }
    p.skip_blank()?;
    let node = p.value(0)?;
    p.skip_blank()?;
    if p.at != text.len() {
        return Err(p.error("unexpected text after the JSON value"));
    }
    Ok(node)
}

/// `s` as a JSON string literal, quotes included.
pub fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("\"{s}\""))
}

/// One replacement of a byte range of the text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    pub range: Range<usize>,
    pub text: String,
}

/// `text` with `edits` applied. Edits must not overlap (an insertion is an empty range).
pub fn apply(text: &str, edits: &[Edit]) -> String {
    let mut sorted: Vec<&Edit> = edits.iter().collect();
    sorted.sort_by_key(|e| (e.range.start, e.range.end));
    let mut out = String::with_capacity(text.len() + 256);
    let mut at = 0;
    for edit in sorted {
        debug_assert!(edit.range.start >= at, "overlapping edits");
        out.push_str(&text[at..edit.range.start.max(at)]);
        out.push_str(&edit.text);
        at = edit.range.end.max(at);
    }
    out.push_str(&text[at..]);
    out
}

struct Parser<'a> {
    text: &'a str,
    at: usize,
}

impl Parser<'_> {
    fn error(&self, message: &'static str) -> ParseError {
        let (line, column) = crate::providers::line_col(self.text, self.at);
        ParseError {
            line,
            column,
            message,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    /// Whitespace and comments.
    fn skip_blank(&mut self) -> Result<(), ParseError> {
        let bytes = self.text.as_bytes();
        loop {
            match self.peek() {
                Some(b' ' | b'\t' | b'\n' | b'\r') => self.at += 1,
                Some(b'/') if bytes.get(self.at + 1) == Some(&b'/') => {
                    while self.peek().is_some_and(|b| b != b'\n') {
                        self.at += 1;
                    }
                }
                Some(b'/') if bytes.get(self.at + 1) == Some(&b'*') => {
                    match self.text[self.at + 2..].find("*/") {
                        Some(end) => self.at += 2 + end + 2,
                        None => return Err(self.error("a /* comment is never closed")),
                    }
                }
                _ => return Ok(()),
            }
        }
    }

    fn value(&mut self, depth: usize) -> Result<Node, ParseError> {
        if depth > MAX_DEPTH {
            return Err(self.error("nested too deeply"));
        }
        match self.peek() {
            Some(b'{') => self.object(depth),
            Some(b'[') => self.array(depth),
            Some(b'"') => {
                let (span, value) = self.string()?;
                Ok(Node::String { span, value })
            }
            Some(b'-' | b'0'..=b'9' | b't' | b'f' | b'n') => self.scalar(),
            Some(_) => Err(self.error("expected a JSON value")),
            None => Err(self.error("the file ends where a value was expected")),
        }
    }

    fn object(&mut self, depth: usize) -> Result<Node, ParseError> {
        let start = self.at;
        self.at += 1;
        let mut members = Vec::new();
        loop {
            self.skip_blank()?;
            match self.peek() {
                Some(b'}') => {
                    self.at += 1;
                    return Ok(Node::Object {
                        span: start..self.at,
                        members,
                    });
                }
                Some(b'"') => {}
                _ => return Err(self.error("expected a quoted key or '}'")),
            }
            let (key_span, key) = self.string()?;
            self.skip_blank()?;
            if self.peek() != Some(b':') {
                return Err(self.error("expected ':' after a key"));
            }
            self.at += 1;
            self.skip_blank()?;
            let value = self.value(depth + 1)?;
            members.push(Member {
                key,
                key_span,
                value,
            });
            self.skip_blank()?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => {}
                _ => return Err(self.error("expected ',' or '}' after a value")),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<Node, ParseError> {
        let start = self.at;
        self.at += 1;
        let mut items = Vec::new();
        loop {
            self.skip_blank()?;
            if self.peek() == Some(b']') {
                self.at += 1;
                return Ok(Node::Array {
                    span: start..self.at,
                    items,
                });
            }
            items.push(self.value(depth + 1)?);
            self.skip_blank()?;
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => {}
                _ => return Err(self.error("expected ',' or ']' after a value")),
            }
        }
    }

    /// A string literal: its span (quotes included) and decoded value.
    fn string(&mut self) -> Result<(Range<usize>, String), ParseError> {
        let start = self.at;
        let bytes = self.text.as_bytes();
        let mut i = start + 1;
        loop {
            match bytes.get(i) {
                None => return Err(self.error("a string is never closed")),
                Some(b'"') => break,
                Some(b'\\') => i += 2,
                Some(b) if *b < 0x20 => {
                    self.at = i;
                    return Err(self.error("a control character inside a string"));
                }
                Some(_) => i += 1,
            }
        }
        let end = i + 1;
        let text = self.text;
        let literal = &text[start..end];
        let value: String = serde_json::from_str(literal).map_err(|_| {
            self.at = start;
            self.error("a string with an invalid escape")
        })?;
        self.at = end;
        Ok((start..end, value))
    }

    fn scalar(&mut self) -> Result<Node, ParseError> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'+' | b'.'))
        {
            self.at += 1;
        }
        let word = &self.text[start..self.at];
        let ok = matches!(word, "true" | "false" | "null")
            || serde_json::from_str::<serde_json::Number>(word).is_ok();
        if !ok {
            self.at = start;
            return Err(self.error("expected a number, true, false or null"));
        }
        Ok(Node::Scalar {
            span: start..self.at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_point_at_the_values() {
        let text = "{\n  \"a\": [1, \"x\\n\"],\n  \"b\": {\"c\": true}\n}\n";
        let node = parse(text).expect("parse");
        let a = node.get("a").expect("a");
        assert_eq!(&text[a.span()], "[1, \"x\\n\"]");
        assert_eq!(a.items()[1].as_str(), Some("x\n"));
        let c = node.get("b").and_then(|b| b.get("c")).expect("c");
        assert_eq!(&text[c.span()], "true");
    }

    #[test]
    fn comments_trailing_commas_and_bom_are_accepted() {
        let text = "\u{feff}{ // servers\n \"s\": {\"x\": 1,}, /* end */ }";
        let node = parse(text).expect("parse");
        assert!(node.get("s").and_then(|s| s.get("x")).is_some());
    }

    #[test]
    fn errors_say_where_without_quoting() {
        let err = parse("{\n  \"a\": sk-secret\n}").expect_err("invalid");
        assert_eq!((err.line, err.column), (2, 8));
        assert!(!err.to_string().contains("secret"));
        assert!(parse("{\"a\": 1} x").is_err());
        assert!(parse("{\"a\": \"open").is_err());
        assert!(parse(&"[".repeat(1000)).is_err());
    }

    #[test]
    fn edits_change_only_their_range() {
        let text = "{\"k\":  \"old\" , \"n\": 1.50}";
        let node = parse(text).expect("parse");
        let span = node.get("k").expect("k").span();
        let out = apply(
            text,
            &[Edit {
                range: span,
                text: quote("new"),
            }],
        );
        assert_eq!(out, "{\"k\":  \"new\" , \"n\": 1.50}");
    }
}
