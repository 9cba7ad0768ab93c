//! Validation of the ids containerd hands us, which become file and socket names.

use crate::error::{Error, Result};

/// Longest id accepted; containerd's own identifiers stop at 76 characters.
const MAX_ID_LEN: usize = 76;

/// Checks that `id` is usable as a single path component.
///
/// Accepts containerd's identifier alphabet: letters, digits, `.`, `_` and `-`, starting
/// with a letter or digit. That rules out `..`, `/`, empty ids and anything that could
/// step out of a state directory.
pub fn validate(kind: &str, id: &str) -> Result<()> {
    let mut chars = id.chars();
    let Some(first) = chars.next() else {
        return Err(Error::InvalidArgument(format!(
            "{kind} id must not be empty"
        )));
    };
    if id.len() > MAX_ID_LEN {
        return Err(Error::InvalidArgument(format!(
            "{kind} id {id:?} is longer than {MAX_ID_LEN} characters"
        )));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if !first.is_ascii_alphanumeric() || !chars.all(allowed) {
        return Err(Error::InvalidArgument(format!(
            "{kind} id {id:?} must be letters, digits, '.', '_' or '-', starting with a letter \
             or digit"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;

    #[test]
    fn accepts_containerd_ids() {
        validate("sandbox", &"a1".repeat(32)).unwrap();
        validate("sandbox", "pod-1_x.y").unwrap();
    }

    #[test]
    fn rejects_path_like_ids() {
        for bad in [
            "", "..", "../x", "a/b", "/abs", ".hidden", "-flag", "a b", "x\0y",
        ] {
            let err = validate("sandbox", bad).unwrap_err();
            assert!(err.to_string().contains("sandbox id"), "{bad:?}: {err}");
        }
        assert!(validate("sandbox", &"a".repeat(77)).is_err());
    }
}
