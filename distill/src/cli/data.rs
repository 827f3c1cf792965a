//! `data generate|tokenizer|prepare`, and the `--data`/`--recipe` flags every command that
//! reads examples shares.

use std::path::PathBuf;

use anyhow::{Context, Result};

use edgelm_distill::data::Example;
use edgelm_distill::recipe::{Recipe, Splits};

/// Where examples come from.
#[derive(clap::Args)]
pub struct DataArgs {
    /// Folder with train.jsonl, validation.jsonl, test.jsonl.
    #[arg(long, conflicts_with = "recipe")]
    data: Option<PathBuf>,
    /// Recipe whose data (and, for distill, student settings) to use.
    #[arg(long)]
    recipe: Option<PathBuf>,
}

impl DataArgs {
    pub fn recipe(&self) -> Result<Option<Recipe>> {
        self.recipe.as_deref().map(Recipe::load).transpose().map_err(Into::into)
    }

    pub fn splits(&self) -> Result<Splits> {
        if let Some(r) = self.recipe()? {
            return Ok(r.splits()?);
        }
        let dir = self.data.as_ref().context("give --data DIR (train/validation/test.jsonl) or --recipe FILE")?;
        Ok(Splits::read_dir(dir)?)
    }
}

/// Generate the built-in device-command task (train/validation/test JSONL).
#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Seed; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Training examples (validation and test get a tenth each; a fifth for `home`).
    #[arg(long, default_value_t = 20_000)]
    train: usize,
    /// `commands` (the base task) or `home` (devices and places the base task never has: data
    /// for a fine-tune to teach).
    #[arg(long, value_enum, default_value = "commands")]
    task: TaskArg,
}

/// Which built-in task to write.
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum TaskArg {
    /// The device-command task the teachers are trained on.
    Commands,
    /// The user's own home: new devices and places.
    Home,
}

/// Writes the built-in task.
pub fn generate(a: GenerateArgs) -> Result<()> {
    let GenerateArgs { output, seed, train, task: which } = a;
    use edgelm_distill::data::{task, write_jsonl};
    let s = match which {
        TaskArg::Commands => task::generate(seed, train),
        TaskArg::Home => task::generate_home(seed, train),
    };
    for (name, set) in [("train", &s.train), ("validation", &s.validation), ("test", &s.test)] {
        write_jsonl(&output.join(format!("{name}.jsonl")), set)?;
    }
    eprintln!(
        "wrote {} train, {} validation, {} test examples to {}",
        s.train.len(),
        s.validation.len(),
        s.test.len(),
        output.display()
    );
    Ok(())
}

/// Train a byte-level BPE tokenizer (ChatML special tokens and template) on a data set.
#[derive(clap::Args)]
pub struct TokenizerArgs {
    /// JSONL triples or plain text to learn from.
    input: PathBuf,
    /// Output folder (tokenizer.json, tokenizer_config.json).
    #[arg(short, long)]
    output: PathBuf,
    /// Vocabulary size, special tokens included.
    #[arg(long, default_value_t = 2048)]
    vocab: usize,
    /// Longest sequence recorded in tokenizer_config.json.
    #[arg(long, default_value_t = 512)]
    max_length: usize,
}

/// Trains a tokenizer.
pub fn tokenizer(a: TokenizerArgs) -> Result<()> {
    let TokenizerArgs { input, output, vocab, max_length } = a;
    use edgelm_distill::checkpoint::preset::{train_tokenizer, write_tokenizer};
    let examples = edgelm_distill::data::prepare::read_any(&input)?;
    let tok = train_tokenizer(examples.iter().flat_map(Example::texts), vocab)?;
    write_tokenizer(&output, &tok, max_length)?;
    eprintln!(
        "trained a {}-entry tokenizer on {} examples into {}",
        tok.get_vocab_size(true),
        examples.len(),
        output.display()
    );
    Ok(())
}

/// Normalise, deduplicate, split and optionally augment JSONL triples or plain text.
#[derive(clap::Args)]
pub struct PrepareArgs {
    /// Input file (JSONL with instruction/input/output, or plain text lines).
    input: PathBuf,
    /// Output folder.
    #[arg(short, long)]
    output: PathBuf,
    /// Share for validation.
    #[arg(long, default_value_t = 0.05)]
    validation: f64,
    /// Share for test.
    #[arg(long, default_value_t = 0.05)]
    test: f64,
    /// Shuffle seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Interchangeable entities, comma-separated (e.g. kitchen,garage,office).
    #[arg(long, value_delimiter = ',')]
    swap: Vec<String>,
    /// Augmented copies per example that mentions one of the entities.
    #[arg(long, default_value_t = 0)]
    augment: usize,
}

/// Prepares user data.
pub fn prepare(a: PrepareArgs) -> Result<()> {
    let PrepareArgs { input, output, validation, test, seed, swap, augment } = a;
    use edgelm_distill::data::{prepare, write_jsonl};
    let examples = prepare::read_any(&input)?;
    let opts = prepare::PrepareOptions { validation, test, seed, swap_entities: swap, augment_per_example: augment };
    let p = prepare::prepare(examples, &opts);
    for (name, set) in [("train", &p.train), ("validation", &p.validation), ("test", &p.test)] {
        write_jsonl(&output.join(format!("{name}.jsonl")), set)?;
    }
    eprintln!(
        "read {}, dropped {} duplicates, added {} by entity swaps: {} train, {} validation, {} test in {}",
        p.read,
        p.duplicates,
        p.augmented,
        p.train.len(),
        p.validation.len(),
        p.test.len(),
        output.display()
    );
    Ok(())
}
