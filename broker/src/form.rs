//! `application/x-www-form-urlencoded` values: query parameters (the swap) and token request
//! bodies (OAuth) use the same encoding.

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_into(s.as_bytes(), false, &mut out);
    out
}

/// `bytes` percent-encoded onto `out`: RFC 3986's unreserved characters as they are (and `/`
/// when `keep_slash`), every other byte as `%XX` in upper case. The one encoder of the
/// crate: forms, the policy's canonical query, SigV4's canonical request.
pub fn encode_into(bytes: &[u8], keep_slash: bool, out: &mut String) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
}

/// Decode one `application/x-www-form-urlencoded` value (`+` is a space).
pub fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_tolerates_stray_percents() {
        assert_eq!(decode("a%2Fb+c"), "a/b c");
        assert_eq!(encode("a/b c"), "a%2Fb%20c");
        assert_eq!(decode(&encode("k=v&x y")), "k=v&x y");
        assert_eq!(decode("%zz"), "%zz");
    }

    #[test]
    fn random_text_decodes_without_a_panic_and_encodings_round_trip() {
        let mut rng = crate::test_rng::Rng::new(5);
        let parts = [
            "%", "%2", "%2F", "%zz", "+", "a", "é", "%E9", "%C3%A9", "=", "&", " ",
        ];
        for _ in 0..5000 {
            let text = rng.text(&parts, 10);
            let decoded = decode(&text);
            assert_eq!(decode(&encode(&decoded)), decoded);
        }
    }
}
