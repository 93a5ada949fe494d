//! Settings files (`agent --config`, `server --config`): `key = value` lines,
//! `#` comments, blank lines ignored. One reader for both, so that they accept
//! the same syntax and name a bad line the same way (`FILE:LINE: ...`).

use std::path::Path;

use anyhow::{Context, Result, anyhow};

/// One `key = value` line of a settings file, both sides trimmed.
#[derive(Debug)]
pub(crate) struct Setting<'a> {
    pub(crate) key: &'a str,
    pub(crate) value: &'a str,
    /// `FILE:LINE`, to prefix an error about this line.
    pub(crate) place: String,
}

impl Setting<'_> {
    /// The error for a key the command does not know; `known` lists those it does.
    pub(crate) fn unknown(&self, known: &str) -> anyhow::Error {
        anyhow!(
            "{}: unknown setting {:?} (known: {known})",
            self.place,
            self.key
        )
    }
}

/// Reads the settings file at `path` and hands each setting to `apply`, in the
/// order of the file; the first error (a line without `=`, or what `apply`
/// returns) stops the reading.
pub(crate) fn apply_file(
    path: &Path,
    mut apply: impl FnMut(Setting<'_>) -> Result<()>,
) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    for (number, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let place = format!("{}:{}", path.display(), number + 1);
        let (key, value) = line
            .split_once('=')
            .with_context(|| format!("{place}: expected key = value"))?;
        apply(Setting {
            key: key.trim(),
            value: value.trim(),
            place,
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_applied_in_order_and_a_bad_line_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("settings");
        std::fs::write(&path, "# rates\n a = 1 # first\n\nb=two\nno equals sign\n").unwrap();
        let mut seen = Vec::new();
        let error = apply_file(&path, |s| {
            seen.push((s.key.to_owned(), s.value.to_owned()));
            Ok(())
        })
        .unwrap_err();
        assert_eq!(seen, [("a".into(), "1".into()), ("b".into(), "two".into())]);
        assert!(
            error
                .to_string()
                .ends_with("settings:5: expected key = value"),
            "{error}"
        );
        let error = apply_file(&path, |s| Err(s.unknown("c"))).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with(":2: unknown setting \"a\" (known: c)"),
            "{error}"
        );
    }
}
