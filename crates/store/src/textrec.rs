//! The line format of the store's small workflow records (a source's
//! migration history, a launch's workflow): text a person can read with
//! `cat`, whitespace-separated fields, free text percent-escaped, and a
//! crc32 trailer line so that damage is detected, never read as data.
//!
//! ```text
//! <magic line>
//! <fields> ...
//! crc 1a2b3c4d
//! ```

use crate::error::{Error, ErrorKind};

/// Escapes free text into one field: `%`, spaces, control characters and
/// DEL become `%XX`; everything else (UTF-8 included) stays as it is.
pub(crate) fn escape(text: &str) -> String {
    if text.is_empty() {
        return "%".to_owned();
    }
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '%' || c.is_whitespace() || c.is_control() {
            let mut buf = [0u8; 4];
            for byte in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("%{byte:02X}"));
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The inverse of [`escape`]; `None` for a malformed field.
pub(crate) fn unescape(field: &str) -> Option<String> {
    if field == "%" {
        return Some(String::new());
    }
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut at = 0;
    while at < bytes.len() {
        if bytes[at] == b'%' {
            let hex = field.get(at + 1..at + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            at += 3;
        } else {
            out.push(bytes[at]);
            at += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Cuts `text` to at most `max_bytes`, at a character boundary.
pub(crate) fn truncate(text: &str, max_bytes: usize) -> String {
    if text.len() <= max_bytes {
        return text.to_owned();
    }
    let mut end = max_bytes;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// The record `magic` + `lines`, with its crc trailer.
pub(crate) fn seal(magic: &str, lines: &[String]) -> Vec<u8> {
    let mut body = String::new();
    body.push_str(magic);
    body.push('\n');
    for line in lines {
        body.push_str(line);
        body.push('\n');
    }
    let crc = crc32fast::hash(body.as_bytes());
    body.push_str(&format!("crc {crc:08x}\n"));
    body.into_bytes()
}

/// The lines of a record sealed by [`seal`] under `magic`, after checking
/// its magic and crc; `what` names it in errors.
pub(crate) fn open<'a>(what: &str, magic: &str, bytes: &'a [u8]) -> Result<Vec<&'a str>, Error> {
    let corrupt = |why: &str| Error::new(ErrorKind::Corrupt, format!("{what}: {why}"));
    let text = std::str::from_utf8(bytes).map_err(|_| corrupt("not UTF-8"))?;
    let text = text
        .strip_suffix('\n')
        .ok_or_else(|| corrupt("truncated"))?;
    let body_end = text.rfind('\n').ok_or_else(|| corrupt("no crc line"))? + 1;
    let (body, trailer) = text.split_at(body_end);
    let stated = trailer
        .strip_prefix("crc ")
        .filter(|hex| hex.len() == 8 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .and_then(|hex| u32::from_str_radix(hex, 16).ok())
        .ok_or_else(|| corrupt("bad crc line"))?;
    if stated != crc32fast::hash(body.as_bytes()) {
        return Err(corrupt("checksum mismatch"));
    }
    let mut lines = body.lines();
    if lines.next() != Some(magic) {
        return Err(corrupt("unknown format"));
    }
    Ok(lines.collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_text_round_trips_through_one_field() {
        for text in [
            "",
            "plain",
            "two words",
            "100% tab\there\nnewline",
            "é ü 日本",
            "%",
        ] {
            let field = escape(text);
            assert!(!field.contains(char::is_whitespace), "{field:?}");
            assert_eq!(unescape(&field).as_deref(), Some(text));
        }
        assert_eq!(unescape("%4"), None);
        assert_eq!(unescape("%zz"), None);
        assert_eq!(truncate("aé", 2), "a");
    }

    #[test]
    fn sealed_records_open_and_damage_is_caught() {
        let sealed = seal("magic v1", &["a 1".into(), "b 2".into()]);
        assert_eq!(open("r", "magic v1", &sealed).unwrap(), vec!["a 1", "b 2"]);
        assert!(open("r", "other v1", &sealed).is_err());
        for at in 0..sealed.len() {
            let mut damaged = sealed.clone();
            damaged[at] ^= 0x01;
            assert!(open("r", "magic v1", &damaged).is_err(), "flip at {at}");
        }
        assert!(open("r", "magic v1", &sealed[..sealed.len() - 4]).is_err());
    }
}
