//! Detection + alignment + embedding of every face in a 1280-px photo with SCRFD and ArcFace
//! (the random models of `det_10g` / `w600k_r50` signature from the tests), timed end to end from
//! decoded pixels; `tools/reference/face_bench.py` times insightface 2.1 on the same models,
//! photo and thread count.
//!
//! ```sh
//! ORT_DYLIB_PATH=... cargo bench -p easyphoto-face --bench detect_align_embed -- --threads 1 --runs 10
//! ```
//!
//! Prints one JSON line: faces found, median and best seconds per photo.

use std::path::Path;
use std::time::Instant;

use easyphoto_face::resample::{PilFilter, resize_pil_u8};
use easyphoto_face::{ArcFace, FaceDetector, FaceEmbedder, Scrfd, norm_crop};
use image::RgbImage;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (threads, runs) = (arg("--threads", 1), arg("--runs", 10));
    let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/assets");
    // The 640-px PNG copy enlarged to 1280 px wide with Pillow's bilinear filter, as the Python side does.
    let small = image::open(assets.join("faceapi_sample1_640.png"))?.to_rgb8();
    let (w, h) = (1280, (small.height() * 2) as usize);
    let pixels = resize_pil_u8(
        small.as_raw(),
        (small.width() as usize, small.height() as usize),
        3,
        (w, h),
        PilFilter::Bilinear,
    );
    let img = RgbImage::from_raw(w as u32, h as u32, pixels).ok_or("buffer size")?;

    let detector = Scrfd::load(assets.join("scrfd_random.onnx"), threads)?;
    let embedder = ArcFace::load(assets.join("arcface_random.onnx"), threads)?;
    // Seconds in detection, alignment and embedding, per photo.
    let run = || -> Result<(usize, [f64; 3]), easyphoto_face::FaceError> {
        let start = Instant::now();
        let faces = detector.detect(&img)?;
        let detected = start.elapsed().as_secs_f64();
        let crops = faces.iter().map(|f| norm_crop(&img, &f.landmarks, 112)).collect::<Result<Vec<_>, _>>()?;
        let aligned = start.elapsed().as_secs_f64();
        std::hint::black_box(embedder.embed_aligned_batch(&crops)?);
        Ok((faces.len(), [detected, aligned - detected, start.elapsed().as_secs_f64() - aligned]))
    };
    if args.iter().any(|a| a == "--align-only") {
        // Micro-benchmark of one step: 1000 ArcFace crops of the first face.
        let face = detector.detect(&img)?[0];
        let start = Instant::now();
        for _ in 0..1000 {
            std::hint::black_box(norm_crop(&img, &face.landmarks, 112)?);
        }
        println!("{{\"norm_crop_ms\": {:.4}}}", start.elapsed().as_secs_f64());
        return Ok(());
    }
    let (faces, _) = run()?; // warm-up
    let mut times: Vec<[f64; 3]> = (0..runs).map(|_| run().map(|(_, t)| t)).collect::<Result<_, _>>()?;
    times.sort_by(|a, b| a.iter().sum::<f64>().total_cmp(&b.iter().sum()));
    let (median, best) = (times[times.len() / 2], times[0]);
    println!(
        "{{\"impl\": \"easyphoto-rs\", \"threads\": {threads}, \"faces\": {faces}, \"median_s\": {:.5}, \"best_s\": {:.5}, \"median_detect_s\": {:.5}, \"median_align_s\": {:.5}, \"median_embed_s\": {:.5}}}",
        median.iter().sum::<f64>(),
        best.iter().sum::<f64>(),
        median[0],
        median[1],
        median[2]
    );
    Ok(())
}
