//! The first step of training: the uploaded photos, EXIF-transposed and converted to RGB (as
//! EasyPhoto's `ImageOps.exif_transpose(...).convert("RGB")`), saved as
//! `users/<id>/original_backup/<i>.jpg` in the order given.

use std::path::PathBuf;

use image::RgbImage;
use image::codecs::jpeg::JpegEncoder;

use crate::error::{PipelineError, Result};
use crate::progress::{CancelToken, Observer, Progress};
use crate::user::{UserId, UserStore, write_atomic};

/// The stage name of this step's progress events (one step per photo).
pub const STAGE: &str = "original_backup";

/// JPEG quality of the backups (Pillow's default, which EasyPhoto's `save` uses).
const QUALITY: u8 = 75;

/// Decodes every photo and writes its backup atomically; returns the backup paths. A photo that
/// cannot be decoded is a typed error naming it.
pub fn save_original_backup(
    store: &UserStore,
    id: &UserId,
    photos: &[PathBuf],
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Vec<PathBuf>> {
    let total = Some(photos.len() as u64);
    let mut saved = Vec::with_capacity(photos.len());
    for (i, photo) in photos.iter().enumerate() {
        cancel.check(STAGE)?;
        saved.push(write_backup(store, id, i, &easyphoto_face::load_rgb(photo)?)?);
        observer.progress(Progress { stage: STAGE, step: i as u64 + 1, total, message: id.as_str() });
    }
    Ok(saved)
}

/// [`save_original_backup`] for photos already decoded (upright RGB, e.g. from a server upload).
pub fn save_original_images(
    store: &UserStore,
    id: &UserId,
    images: &[RgbImage],
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<Vec<PathBuf>> {
    let total = Some(images.len() as u64);
    let mut saved = Vec::with_capacity(images.len());
    for (i, rgb) in images.iter().enumerate() {
        cancel.check(STAGE)?;
        saved.push(write_backup(store, id, i, rgb)?);
        observer.progress(Progress { stage: STAGE, step: i as u64 + 1, total, message: id.as_str() });
    }
    Ok(saved)
}

/// Writes the `i`-th backup atomically.
fn write_backup(store: &UserStore, id: &UserId, i: usize, rgb: &RgbImage) -> Result<PathBuf> {
    let path = store.original_photo(id, i);
    let mut jpeg = Vec::new();
    JpegEncoder::new_with_quality(&mut jpeg, QUALITY)
        .encode_image(rgb)
        .map_err(|e| PipelineError::Io { path: path.clone(), source: std::io::Error::other(e) })?;
    write_atomic(&path, &jpeg)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::Silent;

    #[test]
    fn photos_become_rgb_jpegs_at_their_documented_place() {
        let dir = tempfile::tempdir().unwrap();
        let grey = dir.path().join("b_grey.png");
        image::GrayImage::from_fn(40, 30, |x, _| image::Luma([x as u8 * 6])).save(&grey).unwrap();
        let rgba = dir.path().join("a_rgba.png");
        image::RgbaImage::from_fn(24, 48, |x, y| image::Rgba([200, x as u8 * 10, y as u8 * 5, 0])).save(&rgba).unwrap();
        let store = UserStore::new(dir.path().join("root"));
        let id = UserId::new("陈").unwrap();
        let events = std::sync::Mutex::new(Vec::new());
        let observer = |e: Progress<'_>| events.lock().unwrap().push((e.step, e.total));

        let saved = save_original_backup(&store, &id, &[rgba, grey], &observer, &CancelToken::new()).unwrap();
        assert_eq!(saved, vec![store.original_photo(&id, 0), store.original_photo(&id, 1)]);
        assert_eq!(*events.lock().unwrap(), vec![(1, Some(2)), (2, Some(2))]);
        let first = image::open(&saved[0]).unwrap();
        assert_eq!((first.width(), first.height(), first.color()), (24, 48, image::ColorType::Rgb8));
        // Alpha is dropped, not composited: the red channel stays near 200 (JPEG error a few levels).
        let red = first.to_rgb8().get_pixel(12, 24)[0];
        assert!((i32::from(red) - 200).abs() <= 6, "{red}");
        let second = image::open(&saved[1]).unwrap().to_rgb8();
        assert_eq!(second.dimensions(), (40, 30));
        let p = second.get_pixel(20, 15);
        assert!(p[0].abs_diff(120) <= 6 && p[0].abs_diff(p[1]) <= 2 && p[1].abs_diff(p[2]) <= 2, "{p:?}");
    }

    #[test]
    fn a_photo_that_is_not_an_image_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.jpg");
        std::fs::write(&bad, b"\xff\xd8\xff\xe0 truncated").unwrap();
        let store = UserStore::new(dir.path().join("root"));
        let err =
            save_original_backup(&store, &UserId::new("x").unwrap(), &[bad], &Silent, &CancelToken::new()).unwrap_err();
        assert!(matches!(err, PipelineError::Face(_)), "{err:?}");
        assert!(err.to_string().contains("bad.jpg"), "{err}");
        let cancel = CancelToken::new();
        cancel.cancel();
        let err =
            save_original_backup(&store, &UserId::new("x").unwrap(), &[dir.path().join("y.png")], &Silent, &cancel)
                .unwrap_err();
        assert!(matches!(err, PipelineError::Cancelled { .. }), "{err:?}");
    }
}
