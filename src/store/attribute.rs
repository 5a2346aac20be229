//! The compact encoding of an object's metadata in its extended attribute.
//!
//! ext4 keeps a small attribute inside the inode (64 bytes of value for
//! the name `user.imgfunc` in the default 256-byte inodes); a longer one
//! takes a 4 KiB block of its own. An output's metadata written as JSON,
//! `{"type":"image/jpeg","meta":{"imgfunc-chain":"photos:p1",
//! "imgfunc-source":"photos/Wood.jpg"}}`, is 93 bytes: every thumbnail
//! then cost a second disk block (a 10 KB thumbnail took 16 KiB on disk
//! instead of 12), allocated, written and flushed with it, and read again
//! by every `head`. The same metadata in this encoding is 30 bytes; with
//! that chain it stays in the inode for source names of up to 49 bytes.
//!
//! Layout: the tag byte [`TAG`], then the content type, then each user
//! metadata entry as a key and a value:
//!
//! ```text
//! TAG  type  (key value)*
//! type, key: one byte, the 1-based index of a common one in TYPES / KEYS,
//!            or 0 and then the text
//! value, text: its length as an unsigned LEB128 number, then its UTF-8 bytes
//! ```
//!
//! Attributes written as JSON (by earlier versions, always starting with
//! `{`) are still read. The tables are fixed for this tag: an index, once
//! written, keeps its meaning, and a reader of this tag knows every index.
//! Other names are written as text; adding to a table takes a new tag,
//! which readers of this one refuse rather than misread.

use std::collections::BTreeMap;

/// The first byte of an attribute in this encoding (JSON starts with `{`).
pub const TAG: u8 = 1;

/// Content types stored as one byte.
const TYPES: [&str; 10] = [
    "image/jpeg",
    "image/png",
    "image/webp",
    "image/tiff",
    "image/gif",
    "image/bmp",
    "image/avif",
    "application/octet-stream",
    "application/json",
    "text/plain",
];

/// User metadata keys stored as one byte: those the `image` cloudfunc
/// writes on every output (its chain and source).
const KEYS: [&str; 2] = ["imgfunc-chain", "imgfunc-source"];

/// `content_type` and `user_metadata` in the compact encoding.
pub fn encode(content_type: &str, user_metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        2 + content_type.len()
            + user_metadata
                .iter()
                .map(|(k, v)| 4 + k.len() + v.len())
                .sum::<usize>(),
    );
    out.push(TAG);
    put_name(&mut out, content_type, &TYPES);
    for (key, value) in user_metadata {
        put_name(&mut out, key, &KEYS);
        put_text(&mut out, value);
    }
    out
}

/// The content type and user metadata of an attribute in the compact
/// encoding; the error says what does not parse.
pub fn decode(bytes: &[u8]) -> Result<(String, BTreeMap<String, String>), String> {
    let mut rest = match bytes.split_first() {
        Some((&TAG, rest)) => rest,
        Some((tag, _)) => return Err(format!("unknown encoding (first byte {tag:#04x})")),
        None => return Err("empty".into()),
    };
    let content_type = take_name(&mut rest, &TYPES, "content type")?;
    let mut user_metadata = BTreeMap::new();
    while !rest.is_empty() {
        let key = take_name(&mut rest, &KEYS, "metadata key")?;
        let value = take_text(&mut rest, "metadata value")?;
        user_metadata.insert(key, value);
    }
    Ok((content_type, user_metadata))
}

fn put_name(out: &mut Vec<u8>, name: &str, table: &[&str]) {
    match table.iter().position(|&known| known == name) {
        // The tables are far shorter than 255 entries.
        Some(index) => out.push(index as u8 + 1),
        None => {
            out.push(0);
            put_text(out, name);
        }
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    let mut len = text.len();
    while len >= 0x80 {
        out.push((len as u8 & 0x7f) | 0x80);
        len >>= 7;
    }
    out.push(len as u8);
    out.extend_from_slice(text.as_bytes());
}

fn take_name(rest: &mut &[u8], table: &[&str], what: &str) -> Result<String, String> {
    let (&code, tail) = rest
        .split_first()
        .ok_or_else(|| format!("{what} missing"))?;
    *rest = tail;
    match code {
        0 => take_text(rest, what),
        code => table
            .get(code as usize - 1)
            .map(|&known| known.to_string())
            .ok_or_else(|| format!("{what}: unknown code {code}")),
    }
}

fn take_text(rest: &mut &[u8], what: &str) -> Result<String, String> {
    let mut len = 0usize;
    let mut shift = 0;
    loop {
        let (&byte, tail) = rest
            .split_first()
            .ok_or_else(|| format!("{what}: length cut short"))?;
        *rest = tail;
        // Attributes are at most 64 KiB, so a length needs 3 bytes at most.
        if shift > 14 {
            return Err(format!("{what}: length too long"));
        }
        len |= ((byte & 0x7f) as usize) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            break;
        }
    }
    if len > rest.len() {
        return Err(format!(
            "{what}: {len} bytes announced, {} left",
            rest.len()
        ));
    }
    let (text, tail) = rest.split_at(len);
    *rest = tail;
    String::from_utf8(text.to_vec()).map_err(|_| format!("{what}: not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn round_trips_common_and_other_names() {
        let long = "x".repeat(300);
        let cases = [
            ("image/jpeg", meta(&[])),
            (
                "image/webp",
                meta(&[
                    ("imgfunc-chain", "photos:p1,thumbs:%E7%BC%A9"),
                    ("imgfunc-source", "photos/a b.jpg"),
                ]),
            ),
            (
                "application/x-custom; charset=utf-8",
                meta(&[
                    ("", ""),
                    ("水印", "文字"),
                    ("long", &long),
                    ("k", &long[..127]),
                ]),
            ),
            ("", meta(&[("imgfunc-chain", ""), ("k", &long[..128])])),
        ];
        for (content_type, user_metadata) in cases {
            let bytes = encode(content_type, &user_metadata);
            assert_eq!(bytes[0], TAG);
            assert_eq!(
                decode(&bytes).unwrap(),
                (content_type.to_string(), user_metadata)
            );
        }
    }

    #[test]
    fn an_output_s_metadata_fits_in_an_ext4_inode() {
        // What the `image` cloudfunc writes for the load benchmark's
        // longest key, against the 64 bytes ext4 keeps in the inode.
        let bytes = encode(
            "image/jpeg",
            &meta(&[
                ("imgfunc-chain", "photos:p1"),
                ("imgfunc-source", "photos/load/0123-Elephants_3840x2160.jpg"),
            ]),
        );
        assert_eq!(bytes.len(), 55);
    }

    #[test]
    fn damaged_attributes_are_errors_that_say_where() {
        let good = encode("text/x-a", &meta(&[("key", "value")]));
        for cut in 1..good.len() {
            // Every cut but the one between entries is an error.
            let result = decode(&good[..cut]);
            if cut == 1 + 1 + 1 + "text/x-a".len() {
                assert_eq!(result.unwrap().1, meta(&[]));
            } else {
                assert!(result.is_err(), "cut at {cut}: {result:?}");
            }
        }
        assert_eq!(decode(b"").unwrap_err(), "empty");
        assert_eq!(
            decode(b"{\"type\":1}").unwrap_err(),
            "unknown encoding (first byte 0x7b)"
        );
        assert_eq!(
            decode(&[TAG, 99]).unwrap_err(),
            "content type: unknown code 99"
        );
        assert_eq!(
            decode(&[TAG, 1, 9]).unwrap_err(),
            "metadata key: unknown code 9"
        );
        assert_eq!(
            decode(&[TAG, 1, 1, 5, b'a']).unwrap_err(),
            "metadata value: 5 bytes announced, 1 left"
        );
        assert_eq!(
            decode(&[TAG, 1, 1, 0xff, 0xff, 0xff, 0x01]).unwrap_err(),
            "metadata value: length too long"
        );
        assert_eq!(
            decode(&[TAG, 1, 1, 1, 0xff]).unwrap_err(),
            "metadata value: not UTF-8"
        );
    }
}
