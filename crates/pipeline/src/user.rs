//! EasyPhoto's user ids and where a user's files live: the id names a folder and a LoRA file,
//! so it is checked before it touches the file system.

use std::path::{Path, PathBuf};

use crate::error::{PipelineError, Result};

/// A validated user id: 1–64 characters from `[A-Za-z0-9_.-]`, not starting with `.` or `-`,
/// and not EasyPhoto's reserved `none`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

impl UserId {
    pub fn new(id: &str) -> Result<Self> {
        let invalid = |reason: &str| PipelineError::InvalidUserId { id: id.to_string(), reason: reason.to_string() };
        if id.is_empty() {
            return Err(invalid("is empty"));
        }
        if id.len() > 64 {
            return Err(invalid("is longer than 64 characters"));
        }
        if id.eq_ignore_ascii_case("none") {
            return Err(invalid("`none` is reserved"));
        }
        if id.starts_with(['.', '-']) {
            return Err(invalid("must not start with `.` or `-`"));
        }
        if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))) {
            return Err(invalid(&format!("contains {c:?}; use letters, digits, `_`, `-` and `.`")));
        }
        Ok(Self(id.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for UserId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The on-disk layout of users, after EasyPhoto's: `<root>/user_id_infos/<id>/ref_image.jpg`
/// and the trained LoRA `<root>/loras/<id>.safetensors`.
#[derive(Debug, Clone)]
pub struct UserStore {
    root: PathBuf,
}

impl UserStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn user_dir(&self, id: &UserId) -> PathBuf {
        self.root.join("user_id_infos").join(id.as_str())
    }

    pub fn reference_image(&self, id: &UserId) -> PathBuf {
        self.user_dir(id).join("ref_image.jpg")
    }

    pub fn lora_path(&self, id: &UserId) -> PathBuf {
        self.root.join("loras").join(format!("{id}.safetensors"))
    }

    /// Training needs an id that no user has yet (EasyPhoto refuses to overwrite one).
    pub fn check_new(&self, id: &UserId) -> Result<()> {
        if self.user_dir(id).exists() || self.lora_path(id).exists() {
            return Err(PipelineError::UserExists { id: id.to_string(), path: self.user_dir(id) });
        }
        Ok(())
    }

    /// Inference needs the user's reference image and LoRA (EasyPhoto's `check_id_valid`).
    pub fn check_ready(&self, id: &UserId) -> Result<()> {
        for path in [self.reference_image(id), self.lora_path(id)] {
            if !path.is_file() {
                return Err(PipelineError::UserNotReady { id: id.to_string(), missing: path });
            }
        }
        Ok(())
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// crash never leaves a half-written file behind and an existing file is replaced whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| PipelineError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostile_ids_are_refused_with_the_reason() {
        for (id, reason) in [
            ("", "empty"),
            ("none", "reserved"),
            ("NONE", "reserved"),
            ("../../etc/passwd", "must not start"),
            ("a/b", "'/'"),
            ("a\\b", "'\\\\'"),
            ("..", "must not start"),
            ("-rf", "must not start"),
            ("x\0y", "'\\0'"),
            ("名字", "'名'"),
        ] {
            let err = UserId::new(id).unwrap_err().to_string();
            assert!(err.contains(reason), "{id:?}: {err}");
        }
        assert!(UserId::new(&"a".repeat(65)).is_err());
        for ok in ["tmp", "user_01", "Anna.B-2", &"a".repeat(64)] {
            assert_eq!(UserId::new(ok).unwrap().as_str(), ok);
        }
    }

    #[test]
    fn store_checks_new_and_ready_users() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::new(dir.path());
        let id = UserId::new("anna").unwrap();
        store.check_new(&id).unwrap();
        match store.check_ready(&id) {
            Err(PipelineError::UserNotReady { missing, .. }) => assert_eq!(missing, store.reference_image(&id)),
            other => panic!("{other:?}"),
        }
        write_atomic(&store.reference_image(&id), b"jpeg").unwrap();
        match store.check_ready(&id) {
            Err(PipelineError::UserNotReady { missing, .. }) => assert_eq!(missing, store.lora_path(&id)),
            other => panic!("{other:?}"),
        }
        write_atomic(&store.lora_path(&id), b"lora").unwrap();
        store.check_ready(&id).unwrap();
        assert!(matches!(store.check_new(&id), Err(PipelineError::UserExists { .. })));
    }

    #[test]
    fn atomic_write_replaces_whole_files_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out/result.png");
        write_atomic(&path, &[1, 2, 3]).unwrap();
        write_atomic(&path, &[9; 1000]).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), vec![9; 1000]);
        let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(entries.len(), 1);
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, b"x").unwrap();
        let err = write_atomic(&blocked.join("child.png"), b"y").unwrap_err();
        assert!(err.to_string().contains("child.png"), "{err}");
    }
}
