//! Exactly-once word count on Lazarus.
//!
//! `file-source` (UTF-8 lines, replayable by byte offset) → `tokenizer`
//! (`str::split_whitespace`) → `counter` (keyed state: word → count; emits
//! `word<TAB>count` after every increment) → `file-sink` (two-phase commit:
//! output staged per checkpoint under `_staging/`, published as
//! `part-<sink>-<checkpoint>.txt` when the checkpoint commits).
//!
//! So a correct run's output holds, for every word seen N times, exactly the
//! lines `w 1` … `w N`, each once, however often workers are killed.

use std::fs::{self, File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use lazarus_sdk::storage::CheckpointId;
use lazarus_sdk::*;

/// The operator kinds of this binary.
pub fn registry() -> Registry {
    Registry::new()
        .source("file-source", FileSource::new)
        .operator("tokenizer", |ctx| {
            if ctx
                .params
                .get("panic_on_start")
                .is_some_and(|v| v == "tokenizer")
            {
                panic!("tokenizer: panic_on_start is set (used by the tests)");
            }
            Ok(Tokenizer)
        })
        .operator("counter", |ctx| Ok(Counter::new(ctx)))
        .sink("file-sink", FileSink::new)
}

/// Reads lines of a file; its state is the byte offset of the next line.
pub struct FileSource {
    path: PathBuf,
    reader: BufReader<File>,
    offset: u64,
    line: String,
}

impl FileSource {
    fn new(ctx: &Context) -> Result<FileSource, BoxError> {
        if ctx.parallelism != 1 {
            return Err(format!(
                "file-source reads one file: parallelism must be 1, got {}",
                ctx.parallelism
            )
            .into());
        }
        let path = PathBuf::from(ctx.param("input")?);
        // An input that cannot be opened will not appear by restarting.
        let file =
            File::open(&path).map_err(|e| Fatal::new(format!("input {}: {e}", path.display())))?;
        Ok(FileSource {
            path,
            reader: BufReader::with_capacity(1 << 20, file),
            offset: 0,
            line: String::new(),
        })
    }
}

impl Source for FileSource {
    fn poll(&mut self, out: &mut Emitter, max: usize) -> Result<SourcePoll, BoxError> {
        for _ in 0..max {
            self.line.clear();
            let n = self
                .reader
                .read_line(&mut self.line)
                .map_err(|e| format!("reading {}: {e}", self.path.display()))?;
            if n == 0 {
                return Ok(SourcePoll::Exhausted);
            }
            self.offset += n as u64;
            out.emit(Record::new(
                Vec::new(),
                self.line.trim_end_matches(['\n', '\r']).as_bytes(),
            ));
        }
        Ok(SourcePoll::Ready)
    }

    fn snapshot(&mut self) -> Snapshot {
        Snapshot::with_metadata(self.offset.to_le_bytes().to_vec())
    }

    fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        let bytes: [u8; 8] = state.metadata().try_into().map_err(|_| {
            format!(
                "file-source: restored position has {} bytes, expected 8",
                state.metadata().len()
            )
        })?;
        self.offset = u64::from_le_bytes(bytes);
        self.reader.seek(SeekFrom::Start(self.offset))?;
        Ok(())
    }
}

/// Splits lines into words; stateless.
pub struct Tokenizer;

impl Operator for Tokenizer {
    fn process(&mut self, record: Record, out: &mut Emitter) -> Result<(), BoxError> {
        let line = record.value_str().ok_or("tokenizer: line is not UTF-8")?;
        for word in line.split_whitespace() {
            out.emit(Record::new(word.as_bytes(), Vec::new()));
        }
        Ok(())
    }
}

/// Counts words in keyed state; emits `word<TAB>count` per increment.
/// Words are [`ShortString`] keys: held inline up to 22 bytes, so a lookup
/// follows no pointer to the word and a new word allocates nothing.
pub struct Counter {
    counts: KeyedState<ShortString, u64>,
}

impl Counter {
    fn new(ctx: &Context) -> Counter {
        Counter {
            counts: KeyedState::new("counts", ctx),
        }
    }
}

impl Operator for Counter {
    fn process(&mut self, record: Record, out: &mut Emitter) -> Result<(), BoxError> {
        let word = ShortString::from_utf8(&record.key).map_err(|_| "counter: key is not UTF-8")?;
        // A word already counted is updated in place (no lookup by an
        // owned key, no allocation).
        let count = match self.counts.get_mut(&word) {
            Some(count) => {
                *count += 1;
                *count
            }
            None => {
                self.counts.insert(word, 1);
                1
            }
        };
        let line = count_line(&record.key, count);
        // The record's key goes on as the output's key, without a copy.
        out.emit(Record::new(record.key, line));
        Ok(())
    }

    fn snapshot(&mut self) -> Snapshot {
        self.counts.snapshot()
    }

    fn restore(&mut self, state: &Restored) -> Result<(), BoxError> {
        self.counts.restore(state)
    }
}

/// `word<TAB>count`, written without the formatting machinery (a
/// `format!` per record was 7 % of a long-tail run's CPU).
fn count_line(word: &[u8], count: u64) -> Vec<u8> {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = count;
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let mut line = Vec::with_capacity(word.len() + 1 + digits.len() - at);
    line.extend_from_slice(word);
    line.push(b'\t');
    line.extend_from_slice(&digits[at..]);
    line
}

/// Writes lines to files in the output directory, exactly once.
///
/// Layout: `OUTPUT/_staging/sink-<i>/open.tmp` (lines since the last
/// barrier), `OUTPUT/_staging/sink-<i>/<checkpoint>.part` (closed at barrier
/// `checkpoint`, durable), `OUTPUT/part-<i>-<checkpoint>.txt` (published once
/// `checkpoint` committed). Names starting with `_` or `.` are not output.
pub struct FileSink {
    output: PathBuf,
    staging: PathBuf,
    index: u32,
    open: Option<Staged>,
}

/// Lines since the last barrier: `open.tmp` and what is buffered for it.
/// Every full buffer is written and its disk write started at once
/// ([`start_writeback`]), so the fsync at the barrier waits only for the
/// last buffer: with a plain `BufWriter` it waited for the whole second's
/// output, 36 ms on the long-tail corpus.
struct Staged {
    file: File,
    buffer: Vec<u8>,
    written: u64,
}

/// The staging buffer: written (and its disk write started) when full.
const STAGED_BUFFER: usize = 1 << 20;

impl Staged {
    fn write_line(&mut self, line: &[u8]) -> std::io::Result<()> {
        if self.buffer.len() + line.len() + 1 > STAGED_BUFFER {
            self.write_out()?;
        }
        self.buffer.extend_from_slice(line);
        self.buffer.push(b'\n');
        Ok(())
    }

    fn write_out(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.file.write_all(&self.buffer)?;
        let len = self.buffer.len() as u64;
        start_writeback(&self.file, self.written, len);
        self.written += len;
        self.buffer.clear();
        Ok(())
    }
}

fn fsync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl FileSink {
    fn new(ctx: &Context) -> Result<FileSink, BoxError> {
        let output = PathBuf::from(ctx.param("output")?);
        let staging = output.join("_staging").join(format!("sink-{}", ctx.index));
        fs::create_dir_all(&staging).map_err(|e| format!("output {}: {e}", output.display()))?;
        Ok(FileSink {
            output,
            staging,
            index: ctx.index,
            open: None,
        })
    }

    fn open_path(&self) -> PathBuf {
        self.staging.join("open.tmp")
    }

    fn staged(&self) -> Result<Vec<(CheckpointId, PathBuf)>, BoxError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.staging)? {
            let path = entry?.path();
            let Some(id) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".part"))
                .and_then(|n| n.parse::<u64>().ok())
            else {
                continue;
            };
            out.push((CheckpointId(id), path));
        }
        out.sort();
        Ok(out)
    }

    fn publish_up_to(&mut self, n: CheckpointId) -> Result<(), BoxError> {
        let mut any = false;
        for (id, path) in self.staged()? {
            if id <= n {
                let target = self
                    .output
                    .join(format!("part-{}-{:020}.txt", self.index, id.0));
                fs::rename(&path, &target)?;
                any = true;
            }
        }
        if any {
            fsync_dir(&self.output)?;
            fsync_dir(&self.staging)?;
        }
        Ok(())
    }
}

impl Sink for FileSink {
    fn write(&mut self, record: Record) -> Result<(), BoxError> {
        if self.open.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(self.open_path())?;
            self.open = Some(Staged {
                file,
                buffer: Vec::with_capacity(STAGED_BUFFER),
                written: 0,
            });
        }
        let staged = self.open.as_mut().expect("opened above");
        staged.write_line(&record.value)?;
        Ok(())
    }

    fn pre_commit(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError> {
        if let Some(mut staged) = self.open.take() {
            staged.write_out()?;
            staged.file.sync_data()?;
            fs::rename(
                self.open_path(),
                self.staging.join(format!("{:020}.part", checkpoint.0)),
            )?;
            fsync_dir(&self.staging)?;
        }
        Ok(())
    }

    fn commit(&mut self, checkpoint: CheckpointId) -> Result<(), BoxError> {
        self.publish_up_to(checkpoint)
    }

    fn recover(&mut self, restored: Option<CheckpointId>) -> Result<(), BoxError> {
        // Lines after the restored checkpoint will be produced again: drop them.
        let _ = fs::remove_file(self.open_path());
        for (id, path) in self.staged()? {
            if restored.is_none_or(|r| id > r) {
                fs::remove_file(path)?;
            }
        }
        if let Some(r) = restored {
            self.publish_up_to(r)?;
        }
        Ok(())
    }
}

/// `wordcount generate WORDS FILE [SEED [TAIL]]`: a corpus of WORDS words in
/// lines of up to 12, drawn from a skewed vocabulary, deterministic per
/// seed; with TAIL, every other word comes from TAIL further words (see
/// [`generate_with_tail`]).
pub fn generate_cli(args: &[String]) -> Result<(), String> {
    let usage = "usage: wordcount generate WORDS FILE [SEED [TAIL]]";
    let words: u64 = args
        .first()
        .ok_or(usage)?
        .parse()
        .map_err(|_| format!("WORDS must be a number; {usage}"))?;
    let file = args.get(1).ok_or(usage)?;
    let seed: u64 = args
        .get(2)
        .map_or(Ok(7), |s| s.parse())
        .map_err(|_| format!("SEED must be a number; {usage}"))?;
    let tail: u64 = args
        .get(3)
        .map_or(Ok(0), |s| s.parse())
        .map_err(|_| format!("TAIL must be a number; {usage}"))?;
    if args.len() > 4 {
        return Err(format!("too many arguments; {usage}"));
    }
    generate_with_tail(words, Path::new(file), seed, tail).map_err(|e| format!("{file}: {e}"))
}

/// Writes a corpus of `words` words to `path`: a skewed vocabulary of
/// about 20,000 words.
pub fn generate(words: u64, path: &Path, seed: u64) -> std::io::Result<()> {
    generate_with_tail(words, path, seed, 0)
}

/// The syllables that spell word `id` of the generated corpora (ids
/// 20,000 and up are the long tail's), as [`generate_with_tail`] writes it.
///
/// ```
/// let word: String = wordcount::word_syllables(20_000).collect();
/// assert_eq!(word, "zarusgumi");
/// ```
pub fn word_syllables(id: u64) -> impl Iterator<Item = &'static str> {
    const SYLLABLES: [&str; 16] = [
        "la", "za", "rus", "ka", "mi", "to", "ne", "ri", "so", "vu", "pe", "do", "qi", "fa", "gu",
        "he",
    ];
    let mut id = id + 1;
    std::iter::from_fn(move || {
        (id > 0).then(|| {
            let syllable = SYLLABLES[(id % 16) as usize];
            id /= 16;
            syllable
        })
    })
}

/// As [`generate`], and with `tail` > 0 every other word is drawn
/// uniformly from `tail` further words (a long tail, like identifiers in
/// source code: 5 M words with a tail of 730,000 hold about 720,000
/// distinct words).
pub fn generate_with_tail(words: u64, path: &Path, seed: u64, tail: u64) -> std::io::Result<()> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut out = BufWriter::new(File::create(path)?);
    let mut left = words;
    while left > 0 {
        let n = (next() % 12 + 1).min(left);
        for i in 0..n {
            // Skewed vocabulary: small ids are far more frequent (about 20k words).
            let r = next();
            let id = if tail > 0 && r & 2 == 0 {
                20_000 + (r >> 8) % tail
            } else {
                (r % 20_000) % (1 + (r >> 32) % 20_000)
            };
            if i > 0 {
                out.write_all(if r & 1 == 0 { b" " } else { b"  " })?;
            }
            for syllable in word_syllables(id) {
                out.write_all(syllable.as_bytes())?;
            }
        }
        out.write_all(b"\n")?;
        left -= n;
    }
    out.flush()
}

/// `wordcount check INPUT OUTPUT_DIR`: compares the committed output (files
/// not starting with `.` or `_`) with what a plain count of INPUT predicts,
/// as multisets of lines.
pub fn check_cli(args: &[String]) -> Result<String, String> {
    let usage = "usage: wordcount check INPUT OUTPUT_DIR";
    let input = Path::new(args.first().ok_or(usage)?);
    let output = Path::new(args.get(1).ok_or(usage)?);
    let text = fs::read_to_string(input).map_err(|e| format!("{}: {e}", input.display()))?;
    let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    for w in text.split_whitespace() {
        *counts.entry(w).or_default() += 1;
    }
    let mut seen: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    let entries = fs::read_dir(output).map_err(|e| format!("{}: {e}", output.display()))?;
    for entry in entries {
        let path = entry.map_err(|e| e.to_string())?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with('.') || name.starts_with('_') {
            continue;
        }
        for line in fs::read_to_string(&path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .lines()
        {
            *seen.entry(line.to_string()).or_default() += 1;
        }
    }
    let (mut missing, mut doubled) = (0u64, 0u64);
    let mut expected_total = 0u64;
    for (w, n) in &counts {
        for i in 1..=*n {
            expected_total += 1;
            match seen.remove(&format!("{w}\t{i}")) {
                None => missing += 1,
                Some(1) => {}
                Some(k) => doubled += k - 1,
            }
        }
    }
    let unexpected: u64 = seen.values().sum();
    if missing + doubled + unexpected > 0 {
        return Err(format!(
            "output is wrong: {missing} lines missing, {doubled} doubled, {unexpected} unexpected (of {expected_total})"
        ));
    }
    Ok(format!(
        "output ok: {expected_total} lines, each exactly once ({} distinct words)",
        counts.len()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_count_lines_are_word_tab_decimal() {
        for (word, count) in [
            ("a", 1),
            ("word", 10),
            ("zeta", 1234567),
            ("", 0),
            ("max", u64::MAX),
        ] {
            let line = count_line(word.as_bytes(), count);
            assert_eq!(line, format!("{word}\t{count}").into_bytes());
        }
    }

    #[test]
    fn test_the_counter_counts_and_restores_state_written_with_string_keys() {
        let ctx = Context::for_test("counter", 0, 1);
        let mut counter = Counter::new(&ctx);
        let mut out = Emitter::default();
        for w in ["b", "a", "b", "a-word-longer-than-twenty-two-bytes", "b"] {
            counter
                .process(Record::new(w, Vec::new()), &mut out)
                .expect("process");
        }
        let lines: Vec<String> = out
            .records()
            .iter()
            .map(|r| String::from_utf8(r.value.clone()).expect("UTF-8"))
            .collect();
        assert_eq!(lines[4], "b\t3");
        assert_eq!(lines[3], "a-word-longer-than-twenty-two-bytes\t1");
        assert!(counter
            .process(Record::new(vec![0xff], Vec::new()), &mut out)
            .is_err());
        // Parts written by a counter of `String` keys (before ShortString)
        // restore: the archived form is the same.
        let mut old: KeyedState<String, u64> = KeyedState::new("counts", &ctx);
        old.insert("word".to_string(), 7);
        old.insert("x".repeat(30), 2);
        let (parts, metadata) = Snapshot::serialize_for_test(old.snapshot()).expect("snapshot");
        let restored = Restored::from_parts(CheckpointId(1), parts, metadata);
        let mut counter = Counter::new(&ctx);
        counter.restore(&restored).expect("restore");
        counter
            .process(Record::new("word", Vec::new()), &mut out)
            .expect("process");
        counter
            .process(Record::new("x".repeat(30), Vec::new()), &mut out)
            .expect("process");
        let last: Vec<&[u8]> = out
            .records()
            .iter()
            .rev()
            .take(2)
            .map(|r| &r.value[..])
            .collect();
        assert_eq!(
            last,
            [format!("{}\t3", "x".repeat(30)).as_bytes(), b"word\t8"]
        );
    }

    #[test]
    fn test_the_sink_stages_lines_across_buffers_and_publishes_them_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ctx = Context::for_test("sink", 0, 1);
        ctx.params
            .insert("output".into(), dir.path().display().to_string());
        let mut sink = FileSink::new(&ctx).expect("sink");
        // More than two staging buffers of lines, so full buffers are
        // written (and their disk write started) before the barrier.
        let lines: Vec<String> = (0..300_000).map(|i| format!("word{i}\t{i}")).collect();
        for line in &lines[..200_000] {
            sink.write(Record::new("k", line.clone())).expect("write");
        }
        sink.pre_commit(CheckpointId(1)).expect("pre-commit 1");
        for line in &lines[200_000..] {
            sink.write(Record::new("k", line.clone())).expect("write");
        }
        sink.pre_commit(CheckpointId(2)).expect("pre-commit 2");
        sink.commit(CheckpointId(1)).expect("commit 1");
        let published = |n: u64| {
            fs::read_to_string(dir.path().join(format!("part-0-{n:020}.txt"))).expect("published")
        };
        assert_eq!(published(1), lines[..200_000].join("\n") + "\n");
        assert!(!dir.path().join(format!("part-0-{:020}.txt", 2)).exists());
        sink.commit(CheckpointId(2)).expect("commit 2");
        assert_eq!(published(2), lines[200_000..].join("\n") + "\n");
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn test_generate_cli_takes_a_tail_and_names_bad_arguments() {
        let dir = std::env::temp_dir().join(format!("wc-gen-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let (cli, direct) = (dir.join("cli.txt"), dir.join("direct.txt"));
        let cli_s = cli.display().to_string();
        generate_cli(&args(&["5000", &cli_s, "3", "1000"])).expect("generate");
        generate_with_tail(5000, &direct, 3, 1000).expect("generate");
        assert_eq!(
            fs::read(&cli).expect("cli"),
            fs::read(&direct).expect("direct")
        );
        // Without TAIL: the plain generated corpus, which differs.
        generate_cli(&args(&["5000", &cli_s, "3"])).expect("generate");
        assert_ne!(
            fs::read(&cli).expect("cli"),
            fs::read(&direct).expect("direct")
        );
        let err = generate_cli(&args(&["5000", &cli_s, "3", "many"])).expect_err("bad TAIL");
        assert!(err.starts_with("TAIL must be a number"), "{err}");
        let err =
            generate_cli(&args(&["5000", &cli_s, "3", "10", "x"])).expect_err("extra argument");
        assert!(err.starts_with("too many arguments"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
