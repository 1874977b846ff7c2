//! `${VAR}`, `${VAR:-default}` and `${file:/path}` expansion for values of the shard map and of
//! `cellgate.toml` (connection strings, tokens): reads the environment and secret files (systemd
//! credentials, Kubernetes secret volumes); never puts what it read into an error. Knows nothing
//! of what the values are for. Also the stamp that tells a watched secret file changed.

/// Why `${VAR}` expansion failed. Never carries the surrounding text (it may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("environment variable ${{{0}}} is not set")]
    Missing(String),
    #[error("unterminated ${{ in a value")]
    Unterminated,
    #[error("invalid variable name in ${{...}}: {0:?}")]
    BadName(String),
    /// `${file:PATH}` could not be used; `problem` never quotes the file's content.
    #[error("secret file {path}: {problem}")]
    File { path: String, problem: String },
}

/// Largest secret file read (a password, a token, a connection string).
const MAX_SECRET_FILE: u64 = 64 * 1024;

/// The content of a secret file for `${file:PATH}`, trimmed: the path must be absolute, the file
/// (after symlinks: Kubernetes secret volumes are symlinks) readable by its owner only — a
/// group- or world-readable secret is refused, not warned about — and at most 64 KiB of UTF-8.
pub fn read_secret_file(path: &str) -> Result<String, ExpandError> {
    let fail = |problem: String| ExpandError::File { path: path.to_string(), problem };
    if !path.starts_with('/') {
        return Err(fail("the path must be absolute".into()));
    }
    let meta = std::fs::metadata(path).map_err(|e| fail(e.kind().to_string()))?;
    if !meta.is_file() {
        return Err(fail("not a regular file".into()));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(fail(format!(
                "mode {mode:04o} lets group or others read it; make it 0400 or 0600 (Kubernetes: defaultMode: 0400)"
            )));
        }
    }
    if meta.len() > MAX_SECRET_FILE {
        return Err(fail(format!("larger than {MAX_SECRET_FILE} bytes")));
    }
    let bytes = std::fs::read(path).map_err(|e| fail(e.kind().to_string()))?;
    let text = String::from_utf8(bytes).map_err(|_| fail("not UTF-8".into()))?;
    Ok(text.trim().to_string())
}

/// Expands `${VAR}` and `${VAR:-default}` from `lookup`, and `${file:/path}` from the file
/// ([`read_secret_file`]). Only the braced form is special: `$VAR` and `$$` stay literal.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, ExpandError> {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or(ExpandError::Unterminated)?;
        let inner = &after[..end];
        // `${file:/run/secrets/pw}`: the file's content, read now (every reload reads it again).
        if let Some(path) = inner.strip_prefix("file:") {
            out.push_str(&read_secret_file(path)?);
            rest = &after[end + 1..];
            continue;
        }
        // `${VAR:-default}`: the default applies when VAR is unset (as in POSIX shells).
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        let valid = !name.is_empty()
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !name.starts_with(|c: char| c.is_ascii_digit());
        if !valid {
            return Err(ExpandError::BadName(name.to_string()));
        }
        let value = lookup(name)
            .or_else(|| default.map(str::to_string))
            .ok_or_else(|| ExpandError::Missing(name.to_string()))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// How a watched file looks now: modified time, status-change time (a `chmod` changes only
/// that), size and inode, after symlinks (a Kubernetes secret volume swaps a symlink, which
/// changes the inode behind the path). `None`: the file cannot be read. Compared, never shown.
pub type FileStamp = (std::time::SystemTime, i64, i64, u64, u64);

pub fn file_stamp(path: &std::path::Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().unwrap_or(std::time::SystemTime::UNIX_EPOCH), m.ctime(), m.ctime_nsec(), m.len(), m.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("s3cret".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expansion_table() {
        let cases: &[(&str, Result<&str, ExpandError>)] = &[
            ("postgres://a:${PW}@h/db", Ok("postgres://a:s3cret@h/db")),
            ("no vars", Ok("no vars")),
            ("${PW}${PW}", Ok("s3crets3cret")),
            ("x${EMPTY}y", Ok("xy")),
            ("$PW stays", Ok("$PW stays")),
            ("${NOPE}", Err(ExpandError::Missing("NOPE".into()))),
            ("${PW", Err(ExpandError::Unterminated)),
            ("${}", Err(ExpandError::BadName(String::new()))),
            ("${1A}", Err(ExpandError::BadName("1A".into()))),
            ("${A-B}", Err(ExpandError::BadName("A-B".into()))),
            ("h:${PORT:-5432}", Ok("h:5432")),
            ("${PW:-x}", Ok("s3cret")),
            ("${NOPE:-}", Ok("")),
        ];
        for (input, want) in cases {
            let got = expand(input, env);
            assert_eq!(got.as_deref().map_err(Clone::clone), want.clone().as_deref().map_err(Clone::clone), "{input}");
        }
    }

    #[test]
    fn secret_files_are_read_trimmed_and_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("cellgate-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "canary-file-pw\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let path = file.display().to_string();
        let url = format!("postgres://app:${{file:{path}}}@h/db");
        assert_eq!(expand(&url, env).unwrap(), "postgres://app:canary-file-pw@h/db");
        // Rotation: the next expansion (the next reload) reads the new content.
        std::fs::write(&file, "rotated\n").unwrap();
        assert_eq!(expand(&url, env).unwrap(), "postgres://app:rotated@h/db");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = expand(&url, env).unwrap_err().to_string();
        assert!(e.contains("mode 0644") && e.contains(&path) && !e.contains("rotated"), "{e}");
        // A symlink to a private file (Kubernetes secret volumes) is followed.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o400)).unwrap();
        let link = dir.join("link");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(expand(&format!("${{file:{}}}", link.display()), env).unwrap(), "rotated");
        let missing = expand(&format!("${{file:{}/nope}}", dir.display()), env).unwrap_err();
        assert!(matches!(missing, ExpandError::File { .. }), "{missing}");
        let relative = expand("${file:pw}", env).unwrap_err().to_string();
        assert!(relative.contains("absolute"), "{relative}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
