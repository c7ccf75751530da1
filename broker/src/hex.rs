//! Lowercase hex, the one encoder for digests and MACs (the audit chain, SigV4, import
//! records, the embedded shim's directory name).

use ring::digest::{digest, SHA256};

/// `bytes` as lowercase hex. By table, not `format!` per byte: the audit writer encodes a MAC
/// per line, one line per proxied request.
pub fn lower(bytes: &[u8]) -> String {
    let mut out = vec![0; bytes.len() * 2];
    lower_into(bytes, &mut out);
    // Hex digits only, so always UTF-8.
    String::from_utf8(out).unwrap_or_default()
}

/// `bytes` as lowercase hex into `out`, two digits a byte, as far as `out` goes (it is
/// meant to be twice as long as `bytes`): for a MAC kept in an array, not a `String`.
pub fn lower_into(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (b, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 15)];
    }
}

/// The SHA-256 of `data`, as lowercase hex.
pub fn sha256(data: &[u8]) -> String {
    lower(digest(&SHA256, data).as_ref())
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowercase_two_digits_a_byte() {
        assert_eq!(super::lower(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(
            super::sha256(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
