//! User ids and where a user's files live.
//!
//! An id names a folder and a LoRA file, so it is checked before it touches the file system.
//! Unlike EasyPhoto, which refuses non-ASCII names, any Unicode name is accepted (`王小明`,
//! `José`), normalised to NFC so that one name is always one folder; what could leave the root
//! or is not a portable file name is refused with the reason.
//!
//! # On-disk layout
//!
//! Everything of user `<id>` lives in `<root>/users/<id>/` (EasyPhoto's
//! `easyphoto-user-id-infos/<id>/`, with the final LoRA kept beside the rest):
//!
//! ```text
//! user.json                                        metadata (UserInfo)
//! original_backup/<i>.jpg                          the uploaded photos, EXIF-transposed RGB
//! ref_image.jpg                                    the reference photo (roll angle × identity)
//! processed_images/train/<i>.jpg                   face crops on white, the training set
//! processed_images/train/<i>.txt                   their caption
//! processed_images/metadata.jsonl                  {"file_name": "train/<i>.jpg", "text": caption}
//! user_weights/checkpoint-<step>.safetensors       LoRA checkpoints
//! user_weights/train_state.safetensors             optimizer state, to resume training
//! user_weights/validation/step-<step>_template-<k>.jpg   validation images
//! user_weights/best_outputs/<id>.safetensors       the final (fused) LoRA
//! user_weights/best_outputs/face_id.jpg            the best validation face
//! ```
//!
//! Every file is written with [`write_atomic`] (temporary file in the same folder, then rename).

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};
use unicode_normalization::UnicodeNormalization;

use crate::error::{PipelineError, Result};

/// The longest id, in characters (64 CJK characters are 192 UTF-8 bytes, within every file
/// system's 255-byte name limit once `.safetensors` is appended).
pub const MAX_USER_ID_CHARS: usize = 64;

/// A validated user id: a non-empty NFC name of at most 64 characters that is a single portable
/// file name (no separators, control or invisible characters, `.`/`..`, Windows-reserved names
/// or characters, leading `-`/`.` or trailing `.`/space), and not EasyPhoto's reserved `none`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    pub fn new(id: &str) -> Result<Self> {
        let invalid = |reason: String| PipelineError::InvalidUserId { id: id.to_string(), reason };
        let nfc: String = id.nfc().collect();
        check_file_name(&nfc).map_err(invalid)?;
        if nfc.trim().eq_ignore_ascii_case("none") {
            return Err(invalid("`none` is reserved (it skips a face in multi-person templates)".into()));
        }
        if nfc.starts_with('-') {
            return Err(invalid("must not start with `-`".into()));
        }
        Ok(Self(nfc))
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

/// Checks that `name` is one portable file name that cannot leave its folder.
fn check_file_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name.chars().count() > MAX_USER_ID_CHARS {
        return Err(format!("is longer than {MAX_USER_ID_CHARS} characters"));
    }
    if name == "." || name == ".." {
        return Err("`.` and `..` name folders, not users".into());
    }
    if let Some(c) = name.chars().find(|&c| matches!(c, '/' | '\\')) {
        return Err(format!("contains the path separator {c:?}"));
    }
    if let Some(c) = name.chars().find(|&c| c.is_control() || is_invisible(c)) {
        return Err(format!("contains the control or invisible character U+{:04X}", c as u32));
    }
    if let Some(c) = name.chars().find(|&c| matches!(c, ':' | '*' | '?' | '"' | '<' | '>' | '|')) {
        return Err(format!("contains {c:?}, which Windows forbids in file names"));
    }
    if name.starts_with('.') {
        return Err("must not start with `.` (hidden files)".into());
    }
    if name.ends_with(['.', ' ']) || name.starts_with(' ') {
        return Err("must not start with a space or end with `.` or a space".into());
    }
    let stem = name.split('.').next().unwrap_or(name).trim_end().to_ascii_uppercase();
    let reserved = matches!(stem.as_str(), "CON" | "PRN" | "AUX" | "NUL")
        || (stem.len() == 4
            && (stem.starts_with("COM") || stem.starts_with("LPT"))
            && stem[3..].chars().all(|c| c.is_ascii_digit() && c != '0'))
        || stem.strip_prefix("COM").or_else(|| stem.strip_prefix("LPT")).is_some_and(|d| matches!(d, "¹" | "²" | "³"));
    if reserved {
        return Err(format!("`{stem}` is a reserved device name on Windows"));
    }
    let mut components = Path::new(name).components();
    if !matches!((components.next(), components.next()), (Some(Component::Normal(_)), None)) {
        return Err("is not a single file name".into());
    }
    Ok(())
}

/// Zero-width and bidirectional-control characters, which make two names look identical.
fn is_invisible(c: char) -> bool {
    matches!(c as u32, 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x2064 | 0x2066..=0x2069 | 0xFEFF)
}

/// What `user.json` records about a user; the flows fill it as they go.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserInfo {
    pub user_id: String,
    /// The base checkpoint the LoRA was trained on (file name).
    pub sd_model_checkpoint: String,
    /// Photos uploaded and photos kept for training (EasyPhoto keeps the top 15).
    pub photos_uploaded: usize,
    pub photos_kept: usize,
    pub max_train_steps: u32,
    pub seed: u64,
    /// Checkpoint steps averaged into the final LoRA (repeats weight a checkpoint).
    pub fused_steps: Vec<u32>,
    /// Face-identity score of the best validation image against the training faces.
    pub best_face_score: Option<f32>,
}

/// The users under one root folder, with the layout described in the [module docs](self).
#[derive(Debug, Clone)]
pub struct UserStore {
    root: PathBuf,
}

impl UserStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The folder of every user.
    pub fn users_dir(&self) -> PathBuf {
        self.root.join("users")
    }

    pub fn user_dir(&self, id: &UserId) -> PathBuf {
        self.users_dir().join(id.as_str())
    }

    pub fn info_path(&self, id: &UserId) -> PathBuf {
        self.user_dir(id).join("user.json")
    }

    /// The `i`-th uploaded photo, EXIF-transposed.
    pub fn original_photo(&self, id: &UserId, i: usize) -> PathBuf {
        self.user_dir(id).join("original_backup").join(format!("{i}.jpg"))
    }

    pub fn reference_image(&self, id: &UserId) -> PathBuf {
        self.user_dir(id).join("ref_image.jpg")
    }

    pub fn processed_dir(&self, id: &UserId) -> PathBuf {
        self.user_dir(id).join("processed_images")
    }

    /// The `i`-th training crop.
    pub fn processed_image(&self, id: &UserId, i: usize) -> PathBuf {
        self.processed_dir(id).join("train").join(format!("{i}.jpg"))
    }

    /// The caption of the `i`-th training crop.
    pub fn caption(&self, id: &UserId, i: usize) -> PathBuf {
        self.processed_dir(id).join("train").join(format!("{i}.txt"))
    }

    pub fn metadata_jsonl(&self, id: &UserId) -> PathBuf {
        self.processed_dir(id).join("metadata.jsonl")
    }

    pub fn weights_dir(&self, id: &UserId) -> PathBuf {
        self.user_dir(id).join("user_weights")
    }

    pub fn checkpoint(&self, id: &UserId, step: u32) -> PathBuf {
        self.weights_dir(id).join(format!("checkpoint-{step}.safetensors"))
    }

    /// The validation image of template `template` (its index) after `step` steps.
    pub fn validation_image(&self, id: &UserId, step: u32, template: usize) -> PathBuf {
        self.weights_dir(id).join("validation").join(format!("step-{step}_template-{template}.jpg"))
    }

    /// The final LoRA, what inference loads.
    pub fn lora_path(&self, id: &UserId) -> PathBuf {
        self.weights_dir(id).join("best_outputs").join(format!("{id}.safetensors"))
    }

    /// The best validation face, the source of the affine paste at inference.
    pub fn best_face_image(&self, id: &UserId) -> PathBuf {
        self.weights_dir(id).join("best_outputs").join("face_id.jpg")
    }

    /// Every user with a folder, sorted; folders whose names are not valid ids are skipped.
    pub fn list(&self) -> Result<Vec<UserId>> {
        let dir = self.users_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(PipelineError::Read { path: dir, source }),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PipelineError::Read { path: dir.clone(), source })?;
            if let Some(id) = entry.file_name().to_str().and_then(|name| UserId::new(name).ok())
                && entry.path().is_dir()
                && id.as_str() == entry.file_name()
            {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Training needs an id that no user has yet (EasyPhoto refuses to overwrite one). Ids that
    /// differ only in case are the same folder on Windows and macOS, so they count as taken.
    pub fn check_new(&self, id: &UserId) -> Result<()> {
        let lower = id.as_str().to_lowercase();
        if let Some(taken) = self.list()?.into_iter().find(|other| other.as_str().to_lowercase() == lower) {
            return Err(PipelineError::UserExists { id: id.to_string(), path: self.user_dir(&taken) });
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

    pub fn write_info(&self, id: &UserId, info: &UserInfo) -> Result<()> {
        let path = self.info_path(id);
        let json =
            serde_json::to_vec_pretty(info).map_err(|source| PipelineError::Json { path: path.clone(), source })?;
        write_atomic(&path, &json)
    }

    pub fn read_info(&self, id: &UserId) -> Result<UserInfo> {
        let path = self.info_path(id);
        let bytes = std::fs::read(&path).map_err(|source| PipelineError::Read { path: path.clone(), source })?;
        serde_json::from_slice(&bytes).map_err(|source| PipelineError::Json { path, source })
    }
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename, so a
/// crash never leaves a half-written file behind and an existing file is replaced whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| PipelineError::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    // Readable like any file the user creates (mode 0o666 less the umask), not the 0o600 of a
    // temporary file.
    let mut builder = tempfile::Builder::new();
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(dir).map_err(io)?;
    std::io::Write::write_all(&mut tmp, bytes).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(unix)]
    #[test]
    fn atomic_writes_get_the_mode_of_an_ordinary_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (ours, plain) = (dir.path().join("ours.png"), dir.path().join("plain.png"));
        write_atomic(&ours, b"x").unwrap();
        std::fs::write(&plain, b"x").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ours), mode(&plain));
    }

    #[test]
    fn hostile_ids_are_refused_with_the_reason() {
        let long = "a".repeat(MAX_USER_ID_CHARS + 1);
        for (id, reason) in [
            ("", "empty"),
            ("none", "reserved"),
            ("NONE", "reserved"),
            ("../../etc", "separator '/'"),
            ("../../etc/passwd", "separator '/'"),
            ("/etc/passwd", "separator '/'"),
            ("C:\\Windows", "separator '\\\\'"),
            ("C:", "Windows forbids"),
            ("a/b", "separator '/'"),
            ("a\\b", "separator '\\\\'"),
            (".", "`.` and `..`"),
            ("..", "`.` and `..`"),
            (".hidden", "must not start with `.`"),
            ("-rf", "must not start with `-`"),
            ("x\0y", "U+0000"),
            ("x\ny", "U+000A"),
            ("ab\u{202E}cd", "U+202E"),
            ("a\u{200B}", "U+200B"),
            ("CON", "reserved device"),
            ("con.txt", "reserved device"),
            ("Lpt9", "reserved device"),
            ("COM¹", "reserved device"),
            ("nul .jpg", "reserved device"),
            ("trailing.", "end with"),
            ("trailing ", "end with"),
            (" leading", "start with a space"),
            ("a*b", "Windows forbids"),
            (long.as_str(), "longer than 64"),
        ] {
            let err = UserId::new(id).unwrap_err().to_string();
            assert!(err.contains(reason), "{id:?}: {err}");
        }
    }

    #[test]
    fn unicode_ids_are_accepted_and_normalised() {
        for ok in ["tmp", "user_01", "Anna.B-2", "王小明", "José", "Zoë 2", "COM10", "console", &"名".repeat(64)]
        {
            assert_eq!(UserId::new(ok).unwrap().as_str(), ok);
        }
        // "é" as e + combining acute (NFD, what macOS file names use) is the same user as "é".
        assert_eq!(UserId::new("Jose\u{301}").unwrap(), UserId::new("José").unwrap());
        assert_eq!(UserId::new("Jose\u{301}").unwrap().as_str(), "Jos\u{e9}");
    }

    #[test]
    fn every_path_of_a_user_stays_in_its_folder() {
        let store = UserStore::new("/data/easyphoto");
        let id = UserId::new("王小明").unwrap();
        let dir = store.user_dir(&id);
        assert_eq!(dir, Path::new("/data/easyphoto/users/王小明"));
        for path in [
            store.info_path(&id),
            store.original_photo(&id, 3),
            store.reference_image(&id),
            store.processed_image(&id, 0),
            store.caption(&id, 0),
            store.metadata_jsonl(&id),
            store.checkpoint(&id, 100),
            store.validation_image(&id, 100, 2),
            store.lora_path(&id),
            store.best_face_image(&id),
        ] {
            assert!(path.starts_with(&dir), "{}", path.display());
            assert!(path.components().all(|c| matches!(c, Component::RootDir | Component::Normal(_))));
        }
        assert_eq!(store.lora_path(&id), dir.join("user_weights/best_outputs/王小明.safetensors"));
        assert_eq!(store.validation_image(&id, 300, 1), dir.join("user_weights/validation/step-300_template-1.jpg"));
    }

    #[test]
    fn writing_every_file_of_a_user_stays_under_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let store = UserStore::new(outer.path().join("root"));
        for name in ["王小明", "Zoë 2", "a.b", "COM10", "x..y", "🙂"] {
            let id = UserId::new(name).unwrap();
            for path in [
                store.info_path(&id),
                store.original_photo(&id, 0),
                store.reference_image(&id),
                store.processed_image(&id, 0),
                store.caption(&id, 0),
                store.metadata_jsonl(&id),
                store.checkpoint(&id, 100),
                store.validation_image(&id, 100, 0),
                store.lora_path(&id),
                store.best_face_image(&id),
            ] {
                write_atomic(&path, name.as_bytes()).unwrap();
            }
        }
        let mut files = Vec::new();
        let mut stack = vec![outer.path().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() { stack.push(path) } else { files.push(path) }
            }
        }
        assert_eq!(files.len(), 6 * 10);
        assert!(files.iter().all(|f| f.starts_with(store.users_dir())), "{files:?}");
        assert_eq!(store.list().unwrap().len(), 6);
    }

    #[test]
    fn store_checks_new_and_ready_users() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::new(dir.path());
        let id = UserId::new("Anna").unwrap();
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
        // Case-insensitive file systems would put "anna" into Anna's folder.
        match store.check_new(&UserId::new("anna").unwrap()) {
            Err(PipelineError::UserExists { path, .. }) => assert_eq!(path, store.user_dir(&id)),
            other => panic!("{other:?}"),
        }
        assert_eq!(store.list().unwrap(), vec![id]);
    }

    #[test]
    fn user_info_round_trips_and_corrupt_json_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = UserStore::new(dir.path());
        let id = UserId::new("李雷").unwrap();
        let info = UserInfo {
            user_id: id.to_string(),
            sd_model_checkpoint: "Chilloutmix-Ni-pruned-fp16-fix.safetensors".into(),
            photos_uploaded: 7,
            photos_kept: 7,
            max_train_steps: 800,
            seed: 42,
            fused_steps: vec![800, 700, 700],
            best_face_score: Some(0.71),
        };
        store.write_info(&id, &info).unwrap();
        assert_eq!(store.read_info(&id).unwrap(), info);
        std::fs::write(store.info_path(&id), b"{\"user_id\": ").unwrap();
        let err = store.read_info(&id).unwrap_err().to_string();
        assert!(err.contains("user.json"), "{err}");
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
