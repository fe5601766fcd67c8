//! The store file: versioned, checksummed, written atomically. Layout in docs/store-format.md.
//!
//! The file keeps the raw data (per-query tag sets and per-model outcome counts, the per-(tag,
//! model) counts, per-model totals) and the parameters, never only scores, so a loaded store can
//! be merged, updated and re-weighted exactly. Scores are recomputed on load.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::{pyrepr, Result, RouterError};
use crate::table::{index_of, to_u32, Params, Query, Store, Weighting};

/// First bytes of every store file.
pub const MAGIC: &[u8; 8] = b"TAGRSTOR";
/// Format version this build writes. Version 2 adds the live outcomes section (learned
/// outcomes kept as counts, not as queries); version 1 files (no such section) still load.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this build reads.
pub const OLDEST_READ_VERSION: u32 = 1;
/// magic (8) + version (4) + flags (4) + body length (8).
const HEADER_LEN: usize = 24;
/// CRC-32 of header and body.
const TRAILER_LEN: usize = 4;

// ==== Writing ====

/// Serialises the store to bytes (header, body, CRC-32 trailer).
pub fn to_bytes(store: &Store) -> Vec<u8> {
    let mut body = Vec::with_capacity(
        64 + store.n_tags() * (16 + store.n_models() * 12) + store.n_queries() * 48,
    );
    let p = store.params;
    for v in [p.s_win, p.s_tie, p.s_loss, p.prior_strength] {
        body.extend_from_slice(&v.to_le_bytes());
    }
    body.push(p.weighting.code());
    body.extend_from_slice(&[0; 7]);
    for n in [store.models.len(), store.tags.len(), store.queries.len(), 0] {
        put_u32(&mut body, to_u32(n));
    }
    for m in &store.models {
        put_str(&mut body, m);
    }
    for t in &store.tags {
        put_str(&mut body, t);
    }
    for c in &store.model_totals {
        put3(&mut body, *c);
    }
    for col in &store.counts {
        for c in col {
            put3(&mut body, *c);
        }
    }
    for q in &store.queries {
        put_str(&mut body, &q.id);
        put_u32(&mut body, to_u32(q.tags.len()));
        for &t in &q.tags {
            put_u32(&mut body, t);
        }
        put_u32(&mut body, to_u32(q.judged.len()));
        for &(m, c) in &q.judged {
            put_u32(&mut body, m);
            put3(&mut body, c);
        }
    }
    // Version 2: live outcomes (anonymous single-model queries), model-major like the counts.
    for c in &store.anon_totals {
        put3(&mut body, *c);
    }
    for col in &store.anon {
        for c in col {
            put3(&mut body, *c);
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, FORMAT_VERSION);
    put_u32(&mut out, 0);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = crc32fast::hash(&out);
    put_u32(&mut out, crc);
    out
}

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put3(out: &mut Vec<u8>, c: [u32; 3]) {
    for v in c {
        put_u32(out, v);
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, to_u32(s.len()));
    out.extend_from_slice(s.as_bytes());
}

/// Writes the store to `path` atomically: a temporary file in the same directory, fsync, rename
/// over `path`, fsync of the directory. A crash leaves either the old file or the new one, never
/// a partial one; on error the temporary file is removed.
pub fn save(store: &Store, path: &Path) -> Result<()> {
    let bytes = to_bytes(store);
    write_atomic(path, &bytes)
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| RouterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let name = path
        .file_name()
        .ok_or_else(|| RouterError::invalid(format!("{}: not a file path", path.display())))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let tmp = dir.join(format!(
        ".{}.tmp-{}-{}",
        name.to_string_lossy(),
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // Best effort: the temporary may not exist if creating it is what failed.
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    // Make the rename itself durable. Directories cannot be opened for fsync everywhere; the
    // data is already safe in the file, so a failure here is not worth failing the save.
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

// ==== Reading ====

/// The largest store file `load` reads. Every count in the format is a u32, so a real store is
/// far below this; a larger file is refused before any of it is read.
pub const MAX_FILE_LEN: u64 = 1 << 32;

/// Loads a store written by `save`.
///
/// Only a regular file is read (not a device such as /dev/zero, a FIFO, a socket or a
/// directory), at most as many bytes as its metadata announces and never more than
/// `MAX_FILE_LEN`; the header's body length must match the file's length before the body is
/// read.
pub fn load(path: &Path) -> Result<Store> {
    let io = |source| RouterError::Io {
        path: path.to_path_buf(),
        source,
    };
    let format = |reason: String| RouterError::StoreFormat {
        path: path.to_path_buf(),
        reason,
    };
    // stat before open: opening a FIFO for reading blocks until a writer appears.
    let meta = fs::metadata(path).map_err(io)?;
    check_regular(&meta).map_err(format)?;
    let mut f = File::open(path).map_err(io)?;
    // fstat of what was opened: the path may have been replaced in between.
    let meta = f.metadata().map_err(io)?;
    check_regular(&meta).map_err(format)?;
    let len = meta.len();
    let mut header = [0_u8; HEADER_LEN];
    let head_len = usize::try_from(len.min(HEADER_LEN as u64)).unwrap_or(HEADER_LEN);
    f.read_exact(&mut header[..head_len]).map_err(io)?;
    if head_len == HEADER_LEN && &header[..MAGIC.len()] == MAGIC {
        let body_len = u64::from_le_bytes(header[16..24].try_into().unwrap_or_default());
        let want = body_len.saturating_add((HEADER_LEN + TRAILER_LEN) as u64);
        let version = u32::from_le_bytes(header[8..12].try_into().unwrap_or_default());
        if (OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) && want > len {
            return Err(format(format!(
                "truncated: the header announces {want} bytes, the file has {len}"
            )));
        }
    }
    let total = usize::try_from(len).map_err(|_| format(too_large(len)))?;
    let mut bytes = Vec::with_capacity(total);
    bytes.extend_from_slice(&header[..head_len]);
    // `take`: a file that grows while it is read is read only up to the length checked above.
    (&mut f)
        .take(len - head_len as u64)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    from_bytes(&bytes).map_err(format)
}

fn check_regular(meta: &fs::Metadata) -> std::result::Result<(), String> {
    if !meta.is_file() {
        let kind = if meta.is_dir() {
            "a directory"
        } else {
            "a device, FIFO or socket"
        };
        return Err(format!("not a regular file ({kind})"));
    }
    if meta.len() > MAX_FILE_LEN {
        return Err(too_large(meta.len()));
    }
    Ok(())
}

fn too_large(len: u64) -> String {
    format!("{len} bytes, larger than the {MAX_FILE_LEN}-byte limit of a store file")
}

/// Parses a store from bytes; the error is a human-readable reason.
pub fn from_bytes(bytes: &[u8]) -> std::result::Result<Store, String> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a tagrouter store file (bad magic bytes)".into());
    }
    if bytes.len() < HEADER_LEN {
        return Err(format!(
            "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
            bytes.len()
        ));
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or_default());
    if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(format!(
            "store format version {version}, but this build of tagrouter_fast reads versions \
             {OLDEST_READ_VERSION} to {FORMAT_VERSION}; rebuild the store or use a matching tagrouter_fast"
        ));
    }
    let body_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap_or_default());
    let want = (HEADER_LEN + TRAILER_LEN) as u64 + body_len;
    if (bytes.len() as u64) < want {
        return Err(format!(
            "truncated: the header announces {want} bytes, the file has {}",
            bytes.len()
        ));
    }
    if (bytes.len() as u64) > want {
        return Err(format!(
            "corrupt: {} trailing bytes after the store",
            bytes.len() as u64 - want
        ));
    }
    let end = bytes.len() - TRAILER_LEN;
    let stored = u32::from_le_bytes(bytes[end..].try_into().unwrap_or_default());
    if crc32fast::hash(&bytes[..end]) != stored {
        return Err("corrupt: checksum mismatch".into());
    }
    parse_body(&bytes[HEADER_LEN..end], version).map_err(|e| format!("corrupt: {e}"))
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let end =
            end.ok_or_else(|| format!("body ends early at byte {} (needed {n} more)", self.at))?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> std::result::Result<u32, String> {
        let s = self.take(4)?;
        Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    }

    fn f64(&mut self) -> std::result::Result<f64, String> {
        let s = self.take(8)?;
        let mut a = [0_u8; 8];
        a.copy_from_slice(s);
        Ok(f64::from_le_bytes(a))
    }

    fn three(&mut self) -> std::result::Result<[u32; 3], String> {
        Ok([self.u32()?, self.u32()?, self.u32()?])
    }

    fn str(&mut self) -> std::result::Result<&'a str, String> {
        let n = self.u32()? as usize;
        std::str::from_utf8(self.take(n)?).map_err(|_| "a name is not valid UTF-8".to_string())
    }

    fn index(&mut self, bound: usize, what: &str) -> std::result::Result<u32, String> {
        let i = self.u32()?;
        if (i as usize) < bound {
            Ok(i)
        } else {
            Err(format!("{what} index {i} out of range (< {bound})"))
        }
    }
}

fn parse_body(b: &[u8], version: u32) -> std::result::Result<Store, String> {
    let mut c = Cursor { b, at: 0 };
    let (s_win, s_tie, s_loss, prior_strength) = (c.f64()?, c.f64()?, c.f64()?, c.f64()?);
    let wcode = c.take(8)?[0];
    let weighting =
        Weighting::from_code(wcode).ok_or_else(|| format!("unknown weighting code {wcode}"))?;
    let params = Params {
        s_win,
        s_tie,
        s_loss,
        weighting,
        prior_strength,
    };
    params.validate().map_err(|e| e.to_string())?;
    let (nm, nt, nq) = (c.u32()? as usize, c.u32()? as usize, c.u32()? as usize);
    c.u32()?;
    // Bound the allocations by what the body can hold, so a lying count cannot exhaust memory.
    if nm.saturating_mul(nt).saturating_mul(12) > b.len() || nq.saturating_mul(12) > b.len() {
        return Err("table sizes larger than the file".into());
    }
    let models: Vec<String> = (0..nm)
        .map(|_| c.str().map(str::to_owned))
        .collect::<Result<_, _>>()?;
    let tags: Vec<Box<str>> = (0..nt)
        .map(|_| c.str().map(Into::into))
        .collect::<Result<_, _>>()?;
    let model_index = index_of(&models);
    let tag_index = index_of(&tags);
    if model_index.len() != nm || tag_index.len() != nt {
        return Err("duplicate model or tag names".into());
    }
    let model_totals: Vec<[u32; 3]> = (0..nm).map(|_| c.three()).collect::<Result<_, _>>()?;
    let counts = read_columns(&mut c, nm, nt)?;
    let mut queries = Vec::with_capacity(nq);
    for _ in 0..nq {
        let id: Box<str> = c.str()?.into();
        let k = c.u32()? as usize;
        let tags: Box<[u32]> = (0..k)
            .map(|_| c.index(nt, "tag"))
            .collect::<Result<_, _>>()?;
        if tags.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!(
                "query {}: tag list not sorted and distinct",
                pyrepr(&id)
            ));
        }
        let j = c.u32()? as usize;
        if j == 0 || j > nm {
            return Err(format!("query {}: {j} judged models", pyrepr(&id)));
        }
        let judged = (0..j)
            .map(|_| Ok((c.index(nm, "model")?, c.three()?)))
            .collect::<std::result::Result<Vec<_>, String>>()?;
        if (1..judged.len()).any(|i| judged[..i].iter().any(|e| e.0 == judged[i].0)) {
            return Err(format!("query {}: a model judged twice", pyrepr(&id)));
        }
        queries.push(Query { id, tags, judged });
    }
    let (anon_totals, anon) = if version >= 2 {
        let totals: Vec<[u32; 3]> = (0..nm).map(|_| c.three()).collect::<Result<_, _>>()?;
        (totals, read_columns(&mut c, nm, nt)?)
    } else {
        (vec![[0; 3]; nm], vec![vec![[0; 3]; nt]; nm])
    };
    check_counts(&queries, &counts, &model_totals, &anon, &anon_totals)?;
    if c.at != b.len() {
        return Err(format!(
            "{} unread bytes at the end of the body",
            b.len() - c.at
        ));
    }
    let query_index = index_of(&queries.iter().map(|q| &*q.id).collect::<Vec<_>>());
    if query_index.len() != nq {
        return Err("duplicate query ids".into());
    }
    let mut store = Store {
        params,
        models,
        model_index,
        tags,
        tag_index,
        queries,
        query_index,
        counts,
        model_totals,
        anon,
        anon_totals,
        tag_queries: Vec::new(),
        total_tag_queries: 0,
        tag_weight_num: Vec::new(),
        outcome_sums: Vec::new(),
        scores: Vec::new(),
    };
    store.recompute();
    if store.n_tags() != nt {
        return Err("tags carried by no query".into());
    }
    Ok(store)
}

/// `n_models` columns of `n_tags` triples each, model-major.
fn read_columns(
    c: &mut Cursor<'_>,
    nm: usize,
    nt: usize,
) -> std::result::Result<Vec<Vec<[u32; 3]>>, String> {
    let mut cols = Vec::with_capacity(nm);
    for _ in 0..nm {
        let raw = c.take(nt * 12)?;
        cols.push(
            raw.chunks_exact(12)
                .map(|x| {
                    let u = |i: usize| u32::from_le_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]);
                    [u(0), u(4), u(8)]
                })
                .collect::<Vec<_>>(),
        );
    }
    Ok(cols)
}

/// The per-(tag, model) counts and per-model totals are sums over the queries' outcomes. The file
/// stores both (so loading needs no pass over the queries to route), and a file whose parts
/// disagree, from a writer bug or crafted to pass the checksum, must not load as a table whose
/// scores no query supports.
fn check_counts(
    queries: &[Query],
    counts: &[Vec<[u32; 3]>],
    model_totals: &[[u32; 3]],
    anon: &[Vec<[u32; 3]>],
    anon_totals: &[[u32; 3]],
) -> std::result::Result<(), String> {
    let add = |a: &mut [u32; 3], b: [u32; 3]| {
        for (x, y) in a.iter_mut().zip(b) {
            // Saturating: a crafted file must give an error, not an overflow panic.
            *x = x.saturating_add(y);
        }
    };
    // Live outcomes are part of the counts; the named queries make up the rest.
    let mut want = anon.to_vec();
    let mut totals = anon_totals.to_vec();
    for q in queries {
        for &(m, c) in &q.judged {
            add(&mut totals[m as usize], c);
            let col = &mut want[m as usize];
            for &t in &*q.tags {
                add(&mut col[t as usize], c);
            }
        }
    }
    if totals != model_totals {
        return Err("model totals disagree with the per-query outcomes".into());
    }
    if want != counts {
        return Err("tag counts disagree with the per-query outcomes".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::{Outcome, Record};

    fn store() -> Store {
        let r = |q, tags, m, o| Record {
            query_id: q,
            tags,
            model: m,
            outcome: o,
        };
        Store::from_records(
            Params::default(),
            [
                r("q1", &["a", "b"][..], "x", Outcome::Win),
                r("q1", &["a", "b"][..], "y", Outcome::Tie),
                r("q2", &["b"][..], "y", Outcome::Loss),
            ],
        )
        .unwrap()
    }

    #[test]
    fn round_trip_bytes() {
        let s = store();
        let back = from_bytes(&to_bytes(&s)).unwrap();
        assert_eq!(back.models(), s.models());
        assert_eq!(back.score_matrix(), s.score_matrix());
        assert_eq!(to_bytes(&back), to_bytes(&s));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = to_bytes(&store());
        for n in 0..bytes.len() {
            assert!(from_bytes(&bytes[..n]).is_err(), "truncated to {n} bytes");
        }
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0x10;
            assert!(from_bytes(&b).is_err(), "flipped byte {i}");
        }
    }

    /// Re-seals bytes whose body was edited, as a crafted file would be.
    fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
        let end = bytes.len() - TRAILER_LEN;
        let crc = crc32fast::hash(&bytes[..end]);
        bytes[end..].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn counts_that_disagree_with_the_queries_are_an_error() {
        let s = store();
        let bytes = to_bytes(&s);
        // The first count triple follows params (40), sizes (16), names, and the model totals.
        let names: usize = s.models.iter().map(|m| 4 + m.len()).sum::<usize>()
            + s.tags.iter().map(|t| 4 + t.len()).sum::<usize>();
        let totals = HEADER_LEN + 56 + names;
        let first_count = totals + 12 * s.n_models();
        for (at, what) in [(totals, "model totals"), (first_count, "tag counts")] {
            let mut b = bytes.clone();
            b[at] ^= 1;
            let e = from_bytes(&reseal(b)).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }

    fn tmp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tagrouter-{name}-{}", std::process::id()));
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn load_reads_regular_files_only() {
        let d = tmp_dir("load-kinds");
        let e = load(&d).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        #[cfg(unix)]
        {
            let e = load(Path::new("/dev/zero")).unwrap_err();
            assert!(matches!(e, RouterError::StoreFormat { .. }), "{e}");
            assert!(
                e.to_string().contains("/dev/zero: not a regular file"),
                "{e}"
            );
        }
        let p = d.join("s.trs");
        save(&store(), &p).unwrap();
        assert_eq!(load(&p).unwrap().models(), store().models());
        // A header announcing more than the file holds is refused before the body is read.
        let mut b = to_bytes(&store());
        b[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&p, &b).unwrap();
        let e = load(&p).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn other_version_names_both_versions() {
        let mut bytes = to_bytes(&store());
        bytes[8] = 3;
        let e = from_bytes(&bytes).unwrap_err();
        assert!(e.contains("version 3") && e.contains("1 to 2"), "{e}");
    }

    #[test]
    fn version_1_files_still_load() {
        let s = store();
        let v2 = to_bytes(&s);
        // A version 1 file is the version 2 body without the live-outcome section.
        let (nm, nt) = (s.n_models(), s.n_tags());
        let anon_len = nm * 12 + nm * nt * 12;
        let body_end = v2.len() - TRAILER_LEN - anon_len;
        let mut v1 = v2[..body_end].to_vec();
        v1[8..12].copy_from_slice(&1_u32.to_le_bytes());
        let body_len = (body_end - HEADER_LEN) as u64;
        v1[16..24].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let back = from_bytes(&v1).unwrap();
        assert_eq!(to_bytes(&back), v2);
    }

    #[test]
    fn learned_outcomes_round_trip_and_are_checked() {
        let mut s = store();
        s.learn(&["a", "new tag"], "x", Outcome::Win);
        s.learn(&["a"], "newcomer", Outcome::Loss);
        s.recompute();
        let bytes = to_bytes(&s);
        let back = from_bytes(&bytes).unwrap();
        assert_eq!(to_bytes(&back), bytes);
        assert_eq!(back.n_learned(), 2);
        assert_eq!(back.score_matrix(), s.score_matrix());
        // Live counts larger than the counts they are part of: refused, not loaded.
        let mut bad = bytes.clone();
        let at = bad.len() - TRAILER_LEN - 12;
        bad[at] = bad[at].wrapping_add(1);
        let e = from_bytes(&reseal(bad)).unwrap_err();
        assert!(e.contains("disagree"), "{e}");
    }
}
