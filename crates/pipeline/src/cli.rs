//! The `easyphoto` command line: `models list|fetch|verify`, `train`, `infer`, `creative`.
//!
//! Parameters keep EasyPhoto's names: a config file (`--config`, TOML or JSON) and `--set
//! name=value` override any field of [`TrainConfig`] / [`InferConfig`]. `train` and `infer` check
//! their inputs (user ids, photos, templates, models) before any work starts. `train` runs the
//! [train flow](crate::train) (`--resume` continues a stopped one; an SDXL `sd_model_checkpoint`
//! starts from EasyPhoto's SDXL recipe, [`TrainConfig::sdxl`]); `infer` runs the
//! [infer flow](crate::infer) on every template and prints each result with its display scores;
//! `creative` runs the template-free [SDXL path](crate::creative).

use std::io::Write;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::{Deserialize, Serialize};

use crate::components::{ComponentPaths, Components};
use crate::config::{InferConfig, TrainConfig, load_config};
use crate::creative::{CreativeComponents, CreativeConfig, create, load_sdxl};
use crate::download::{Downloader, Fetched};
use crate::error::{PipelineError, Result};
use crate::jobs::{InferJob, TrainJob, Workspace};
use crate::models::{self, Checksum, DEFAULT_ENDPOINT, Flow, Lock, Manifest, ModelFile, Verification};
use crate::progress::{CancelToken, Observer};
use crate::train::{TrainComponents, base_checkpoint, is_sdxl_checkpoint, resume_user, train_user};
use crate::user::{UserId, UserStore};

/// EasyPhoto in Rust: train a face LoRA from photos of a person, then paint them into templates.
#[derive(Debug, Parser)]
#[command(name = "easyphoto", version)]
pub struct Cli {
    /// Where users' files live (`<root>/users/<id>/`).
    #[arg(long, global = true, env = "EASYPHOTO_ROOT", default_value = "easyphoto-data")]
    pub root: PathBuf,
    /// Where model files live (layout: `easyphoto models list`).
    #[arg(long, global = true, env = "EASYPHOTO_MODELS_DIR", default_value = "models")]
    pub models_dir: PathBuf,
    /// Download endpoint, Hugging Face URL scheme (a mirror such as hf-mirror.com works too).
    #[arg(long, global = true, env = "HF_ENDPOINT", default_value = DEFAULT_ENDPOINT)]
    pub endpoint: String,
    /// Never download: report what is missing and where to put it.
    #[arg(long, global = true, env = "HF_HUB_OFFLINE", value_parser = clap::builder::BoolishValueParser::new())]
    pub offline: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// List, download or check the model files.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Train a user's face LoRA from a folder of photos.
    Train(TrainArgs),
    /// Paint trained users into template photos.
    Infer(InferArgs),
    /// Paint a user without a template: SDXL txt2img with the user's SDXL LoRA.
    Creative(CreativeArgs),
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Every model file, its role, licence and whether it is present.
    List(Selection),
    /// Download missing files (resumes partial downloads, checks sizes and sha256; records the
    /// sha256 of files without a published one in `models.lock`).
    Fetch(Selection),
    /// Re-read files and compare sizes and sha256 with the manifest or `models.lock`.
    Verify(Selection),
}

/// Which model files a `models` command works on.
#[derive(Debug, Args)]
pub struct Selection {
    /// Model names (default: all, or those of `--flow`).
    pub names: Vec<String>,
    /// Only the files this flow needs.
    #[arg(long, value_enum)]
    pub flow: Option<FlowArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FlowArg {
    Train,
    Infer,
}

impl From<FlowArg> for Flow {
    fn from(f: FlowArg) -> Self {
        match f {
            FlowArg::Train => Flow::Train,
            FlowArg::Infer => Flow::Infer,
        }
    }
}

/// Parameters shared by `train` and `infer`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// A TOML or JSON file of parameters (EasyPhoto's names; unknown names are errors).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one parameter, e.g. `--set first_diffusion_steps=30` (repeatable).
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The new user's id (any Unicode name that is a valid file name).
    #[arg(long)]
    pub user_id: String,
    /// A folder of 5 to 20 photos of the person (.jpg, .jpeg, .png).
    #[arg(long, required_unless_present = "resume")]
    pub photos: Option<PathBuf>,
    /// Continue the stopped training of this user from its last checkpoint (same parameters).
    #[arg(long)]
    pub resume: bool,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct InferArgs {
    /// Trained user ids, one per face from left to right; `none` skips a face.
    #[arg(long = "user-id", required = true)]
    pub user_ids: Vec<String>,
    /// Template images, or folders of them (repeatable).
    #[arg(long = "template", required = true)]
    pub templates: Vec<PathBuf>,
    /// Folder for the results.
    #[arg(long, default_value = "outputs")]
    pub output: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
}

#[derive(Debug, Args)]
pub struct CreativeArgs {
    /// The user id (needs `ref_image.jpg` and an SDXL LoRA).
    #[arg(long)]
    pub user_id: String,
    /// The SDXL LoRA file (default: the user's final LoRA).
    #[arg(long)]
    pub lora: Option<PathBuf>,
    /// Folder for the results.
    #[arg(long, default_value = "outputs")]
    pub output: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// Runs a parsed command line, printing results to `out` and progress to `observer`.
pub fn run(cli: &Cli, out: &mut dyn Write, observer: &dyn Observer, cancel: &CancelToken) -> Result<()> {
    let manifest = Manifest::embedded()?;
    match &cli.command {
        Command::Models(ModelsCommand::List(sel)) => list(cli, &manifest, sel, out),
        Command::Models(ModelsCommand::Fetch(sel)) => fetch(cli, &manifest, sel, out, observer, cancel),
        Command::Models(ModelsCommand::Verify(sel)) => verify(cli, &manifest, sel, out, observer, cancel),
        Command::Train(args) => train(cli, &manifest, args, out, observer, cancel),
        Command::Infer(args) => infer(cli, &manifest, args, out, observer, cancel),
        Command::Creative(args) => creative(cli, &manifest, args, out, observer, cancel),
    }
}

fn select<'m>(manifest: &'m Manifest, sel: &Selection) -> Result<Vec<&'m ModelFile>> {
    let flow = sel.flow.map(Flow::from);
    if sel.names.is_empty() {
        return Ok(manifest.for_flow(flow).collect());
    }
    sel.names.iter().map(|name| manifest.get(name)).collect()
}

fn print(out: &mut dyn Write, text: std::fmt::Arguments<'_>) -> Result<()> {
    out.write_fmt(text)
        .and_then(|_| out.write_all(b"\n"))
        .map_err(|source| PipelineError::Io { path: "(stdout)".into(), source })
}

fn list(cli: &Cli, manifest: &Manifest, sel: &Selection, out: &mut dyn Write) -> Result<()> {
    for m in select(manifest, sel)? {
        let path = m.local_path(&cli.models_dir);
        let state = if path.is_file() { "present" } else { "missing" };
        let flows: Vec<&str> = m.flows.iter().map(|f| if *f == Flow::Train { "train" } else { "infer" }).collect();
        print(
            out,
            format_args!(
                "{:<20} {:<8} {:>9}  {:<11} {}",
                m.name,
                state,
                m.approx_size,
                flows.join(","),
                path.display()
            ),
        )?;
        print(out, format_args!("{:<20} {}; licence: {}; from {}", "", m.role, m.license, m.url(&cli.endpoint)))?;
    }
    Ok(())
}

fn fetch(
    cli: &Cli,
    manifest: &Manifest,
    sel: &Selection,
    out: &mut dyn Write,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    let models = select(manifest, sel)?;
    if cli.offline {
        let missing: Vec<_> = manifest
            .missing(&cli.models_dir, None, &cli.endpoint)
            .into_iter()
            .filter(|m| models.iter().any(|s| s.name == m.name))
            .collect();
        if !missing.is_empty() {
            return Err(PipelineError::ModelsMissing { models_dir: cli.models_dir.clone(), missing });
        }
        return print(out, format_args!("offline: all {} selected files are present", models.len()));
    }
    let token = std::env::var("HF_TOKEN").ok();
    let downloader = Downloader::new(&cli.endpoint).with_token(token);
    let mut lock = Lock::load(&cli.models_dir)?;
    // One failed file does not stop the others; the first error is returned at the end.
    let mut first_error = None;
    for m in models {
        let was_locked = lock.get(&m.name).is_some();
        match models::fetch_locked(&downloader, m, &cli.models_dir, &mut lock, observer, cancel) {
            Ok(Fetched { sha256: Some(sha), downloaded: true, size, .. }) => {
                let locked = if !was_locked && lock.get(&m.name).is_some() { "; recorded in models.lock" } else { "" };
                print(out, format_args!("{}: downloaded {size} bytes, sha256 {sha}{locked}", m.name))?
            }
            Ok(fetched) => {
                let unpinned = m.sha256 == Checksum::Unknown && lock.get(&m.name).is_none();
                let note = if unpinned { "; unpinned, not downloaded here: see `models verify`" } else { "" };
                print(out, format_args!("{}: present ({} bytes{note})", m.name, fetched.size))?
            }
            Err(e @ PipelineError::Cancelled { .. }) => return Err(e),
            Err(e) => {
                print(out, format_args!("{}: FAILED: {e}", m.name))?;
                first_error.get_or_insert(e);
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn verify(
    cli: &Cli,
    manifest: &Manifest,
    sel: &Selection,
    out: &mut dyn Write,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    let mut missing = Vec::new();
    let mut bad = Vec::new();
    let lock = Lock::load(&cli.models_dir)?;
    for m in select(manifest, sel)? {
        let result = models::verify(m, &cli.models_dir, &lock, observer, cancel)?;
        let source = if m.sha256 == Checksum::Unknown { " (recorded in models.lock)" } else { "" };
        let line = match &result {
            Verification::Missing => {
                missing.extend(
                    manifest.missing(&cli.models_dir, None, &cli.endpoint).into_iter().filter(|x| x.name == m.name),
                );
                "missing".to_string()
            }
            Verification::Verified { sha256 } => format!("ok, sha256 {sha256}"),
            Verification::Locked { sha256 } => format!("ok, sha256 {sha256} (pinned in models.lock at its download)"),
            Verification::Unpinned { sha256, size } => format!(
                "UNPINNED: {size} bytes, sha256 {sha256}; no published sha256 and no models.lock entry \
                 (not downloaded by `models fetch`: compare the sha256 with the file's source)"
            ),
            Verification::WrongSize { expected, actual } => {
                format!("WRONG SIZE: {actual} bytes, expected {expected}{source}")
            }
            Verification::WrongChecksum { expected, actual } => {
                format!("WRONG SHA256: {actual}, expected {expected}{source}")
            }
            Verification::ImplausibleSize { approx, actual } => {
                format!("IMPLAUSIBLE SIZE: {actual} bytes, the file is about {approx} (truncated or not the model?)")
            }
        };
        if !result.is_usable() && result != Verification::Missing {
            bad.push(format!("{} ({})", m.name, m.local_path(&cli.models_dir).display()));
        }
        print(out, format_args!("{}: {line}", m.name))?;
    }
    if !bad.is_empty() {
        return Err(PipelineError::ModelsCorrupt { files: bad });
    }
    if !missing.is_empty() {
        return Err(PipelineError::ModelsMissing { models_dir: cli.models_dir.clone(), missing });
    }
    Ok(())
}

fn workspace(cli: &Cli) -> Workspace {
    Workspace { store: UserStore::new(&cli.root), models_dir: cli.models_dir.clone(), endpoint: cli.endpoint.clone() }
}

fn train(
    cli: &Cli,
    manifest: &Manifest,
    args: &TrainArgs,
    out: &mut dyn Write,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    let id = UserId::new(&args.user_id)?;
    let (file, sets) = (args.config.config.as_deref(), &args.config.set);
    let mut config: TrainConfig = load_config(file, sets)?;
    // An SDXL base starts from EasyPhoto's SDXL recipe, as its UI switches to it.
    if base_checkpoint(manifest, &cli.models_dir, &config).is_ok_and(|p| is_sdxl_checkpoint(&p)) {
        config = load_config::<SdxlTrainConfig>(file, sets)?.0;
    }
    let ws = workspace(cli);
    let (dtype, device) = (candle_core::DType::F32, candle_core::Device::Cpu);
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let load = |config: &TrainConfig| {
        TrainComponents::from_models_dir(manifest, &ws.models_dir, config, &ws.endpoint, dtype, &device, threads)
    };
    let outcome = if args.resume {
        config.validate()?;
        ws.store.read_info(&id)?;
        let mut components = load(&config)?;
        resume_user(&ws.store, &id, &config, &mut components, observer, cancel)?
    } else {
        let photos = args.photos.as_deref().ok_or_else(|| PipelineError::InvalidParameter {
            field: "photos".into(),
            reason: "a folder of photos is needed (or --resume)".into(),
        })?;
        let job = TrainJob::check(&ws, manifest, id, photos, config)?;
        let mut components = load(&job.config)?;
        let photos = crate::train::Photos::Files(&job.photos);
        train_user(&ws.store, &job.user_id, photos, &job.config, &mut components, observer, cancel)?
    };
    print(
        out,
        format_args!(
            "trained {:?}: {} of {} photos, {} steps; LoRA {} (checkpoints {:?}); best face {}",
            outcome.info.user_id,
            outcome.info.photos_kept,
            outcome.info.photos_uploaded,
            outcome.info.max_train_steps,
            outcome.lora.display(),
            outcome.info.fused_steps,
            outcome.best_face.display()
        ),
    )
}

/// [`TrainConfig`] with EasyPhoto's SDXL recipe as its defaults.
#[derive(Serialize, Deserialize)]
#[serde(transparent)]
struct SdxlTrainConfig(TrainConfig);

impl Default for SdxlTrainConfig {
    fn default() -> Self {
        Self(TrainConfig::sdxl())
    }
}

fn infer(
    cli: &Cli,
    manifest: &Manifest,
    args: &InferArgs,
    out: &mut dyn Write,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    let ids = InferJob::parse_user_ids(&args.user_ids)?;
    let config: InferConfig = load_config(args.config.config.as_deref(), &args.config.set)?;
    let ws = workspace(cli);
    let job = InferJob::check(&ws, manifest, ids, &args.templates, &args.output, config)?;
    let paths = ComponentPaths::from_models_dir(manifest, &ws.models_dir, &job.config, &ws.endpoint)?;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut components = Components::load(&paths, candle_core::DType::F32, &candle_core::Device::Cpu, threads)?;
    let report = crate::infer::run_job(&job, &ws.store, &mut components, observer, cancel)?;
    for w in &report.written {
        let scores: Vec<String> = w.faces.iter().map(|f| format!("{}: {:.2}", f.user_id, f.score)).collect();
        print(
            out,
            format_args!("{}: {} (seed {}; {})", w.template.display(), w.image.display(), w.seed, scores.join(", ")),
        )?;
    }
    for (template, e) in &report.failed {
        print(out, format_args!("{}: FAILED, skipped: {e}", template.display()))?;
    }
    Ok(())
}

fn creative(
    cli: &Cli,
    manifest: &Manifest,
    args: &CreativeArgs,
    out: &mut dyn Write,
    observer: &dyn Observer,
    cancel: &CancelToken,
) -> Result<()> {
    let id = UserId::new(&args.user_id)?;
    let config: CreativeConfig = load_config(args.config.config.as_deref(), &args.config.set)?;
    config.validate()?;
    let ws = workspace(cli);
    let store = &ws.store;
    // The user's files before any model loads.
    let lora = args.lora.clone().unwrap_or_else(|| store.lora_path(&id));
    for path in [store.reference_image(&id), lora] {
        if !path.is_file() {
            return Err(PipelineError::UserNotReady { id: id.to_string(), missing: path });
        }
    }
    // The face models of the display score, then the SDXL checkpoint beside the SD1.5 base.
    let missing: Vec<_> = manifest
        .missing(&ws.models_dir, None, &ws.endpoint)
        .into_iter()
        .filter(|m| m.name == "scrfd-10g" || m.name == "arcface-r50")
        .collect();
    if !missing.is_empty() {
        return Err(PipelineError::ModelsMissing { models_dir: ws.models_dir.clone(), missing });
    }
    let path = |name: &str| manifest.get(name).map(|m| m.local_path(&ws.models_dir));
    let named = std::path::Path::new(&config.sd_model_checkpoint);
    let base = if named.exists() {
        named.to_path_buf()
    } else {
        path("chilloutmix")?.parent().unwrap_or(&ws.models_dir).join(&config.sd_model_checkpoint)
    };
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    let mut components = CreativeComponents {
        sd: load_sdxl(&base, candle_core::DType::F32, &candle_core::Device::Cpu)?,
        detector: Box::new(easyphoto_face::Scrfd::load(path("scrfd-10g")?, threads)?),
        embedder: Box::new(easyphoto_face::ArcFace::load(path("arcface-r50")?, threads)?),
    };
    let created = create(store, &id, args.lora.as_deref(), &mut components, &config, &args.output, observer, cancel)?;
    for c in &created {
        let score = c.score.map_or_else(|| "no face".to_string(), |s| format!("{s:.2}"));
        print(out, format_args!("{}: {} (seed {}; {}: {score})", c.user_id, c.image.display(), c.seed, c.user_id))?;
    }
    Ok(())
}
