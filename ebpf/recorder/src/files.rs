//! Files under the roots: resolving (dev, ino) to paths, and evicting them from the page
//! cache for a cold start.
//!
//! Resolution is cheap in the common case: opened and executed names (from the trace) give
//! most paths directly, their directories are listed next, and only what is still missing
//! is searched for by walking the roots. The walk reads directory entries (`d_ino`, no
//! `stat` per file), descends only into directories on devices that still have unresolved
//! inodes, and ends as soon as nothing is left.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::{DirEntryExt, MetadataExt};
use std::path::{Path, PathBuf};

/// A file's identity, as userspace `stat` reports it.
pub(crate) type FileId = (u64, u64);

/// A name an open or exec used, resolved.
#[derive(Debug, Clone)]
pub(crate) struct KnownName {
    /// The file it leads to.
    pub id: FileId,
    /// Its real path (every symlink resolved).
    pub real: PathBuf,
    /// Its directory resolved but its last component kept, which names a symlink when the
    /// name was one.
    pub link: PathBuf,
}

/// Resolves `wanted` (dev, ino) pairs to absolute paths under `roots`.
///
/// A file is named by a regular-file path under a root when it has one; otherwise by a
/// symlink under a root that leads to it (e.g. `/usr/lib/llvm-22/lib/libLLVM.so.22.1`,
/// which points into `/usr/lib/x86_64-linux-gnu`). `known` are names the trace opened or
/// executed; their directories are listed first.
pub(crate) fn resolve(
    roots: &[PathBuf],
    wanted: &HashSet<FileId>,
    known: &[KnownName],
) -> HashMap<FileId, String> {
    let mut found: HashMap<FileId, String> = HashMap::new();
    let mut via_links: HashMap<FileId, String> = HashMap::new();
    let mut dirs: Vec<PathBuf> = Vec::new();
    for k in known {
        let (path, map) = if under_roots(roots, &k.real) {
            (&k.real, &mut found)
        } else if under_roots(roots, &k.link) {
            (&k.link, &mut via_links)
        } else {
            continue;
        };
        if let Some(s) = path.to_str() {
            map.entry(k.id).or_insert_with(|| s.to_owned());
        }
        if let Some(parent) = path.parent()
            && !dirs.iter().any(|d| d == parent)
        {
            dirs.push(parent.to_path_buf());
        }
    }
    let mut remaining = Pending::new(wanted.iter().filter(|id| !found.contains_key(id)));
    let mut out = Found {
        files: found,
        links: via_links,
    };
    for dir in &dirs {
        if remaining.is_empty() {
            break;
        }
        list_dir(dir, &mut remaining, &mut out, None);
    }
    for root in roots {
        if remaining.is_empty() {
            break;
        }
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            if remaining.is_empty() {
                break;
            }
            list_dir(&dir, &mut remaining, &mut out, Some(&mut stack));
        }
    }
    let Found {
        files: mut found,
        links,
    } = out;
    for (id, path) in links {
        if remaining.remove(&id) {
            found.insert(id, path);
        }
    }
    tracing::debug!(
        found = found.len(),
        unresolved = remaining.ids.len(),
        "resolved inodes"
    );
    found
}

/// Lists `dir`: matches its regular files against `remaining`, and pushes its
/// subdirectories on `stack` when given.
/// What a walk found: regular files, and symlinks leading to wanted files.
struct Found {
    files: HashMap<FileId, String>,
    links: HashMap<FileId, String>,
}

fn list_dir(
    dir: &Path,
    remaining: &mut Pending,
    found: &mut Found,
    stack: Option<&mut Vec<PathBuf>>,
) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    let dev = meta.dev();
    // No unresolved inode lives on this device: skip the directory and what is below it
    // (this keeps a walk of `/` out of /proc, /sys and /dev). A filesystem mounted below
    // a directory of another, unwanted device is skipped too.
    if !remaining.devs.contains_key(&dev) {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut subdirs = Vec::new();
    for entry in entries.flatten() {
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            subdirs.push(entry.path());
        } else if kind.is_file() {
            let id = (dev, entry.ino());
            if remaining.remove(&id) {
                let path = entry.path();
                match path.to_str() {
                    Some(s) => {
                        found.files.insert(id, s.to_owned());
                    }
                    None => tracing::debug!(path = %path.display(), "path is not UTF-8"),
                }
            }
        } else if kind.is_symlink() {
            // One stat per symlink (few of them): where does it lead?
            let path = entry.path();
            if let Ok(meta) = std::fs::metadata(&path)
                && meta.is_file()
            {
                let id = (meta.dev(), meta.ino());
                if remaining.ids.contains(&id)
                    && !found.links.contains_key(&id)
                    && let Some(s) = path.to_str()
                {
                    found.links.insert(id, s.to_owned());
                }
            }
        }
    }
    if let Some(stack) = stack {
        // Reverse so the walk visits subdirectories in directory order.
        stack.extend(subdirs.into_iter().rev());
    }
}

/// The inodes still to find, and how many on each device.
struct Pending {
    ids: HashSet<FileId>,
    devs: HashMap<u64, usize>,
}

impl Pending {
    fn new<'a>(ids: impl Iterator<Item = &'a FileId>) -> Self {
        let ids: HashSet<FileId> = ids.copied().collect();
        let mut devs = HashMap::new();
        for (dev, _) in &ids {
            *devs.entry(*dev).or_insert(0) += 1;
        }
        Pending { ids, devs }
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Removes `id`; true when it was pending.
    fn remove(&mut self, id: &FileId) -> bool {
        if !self.ids.remove(id) {
            return false;
        }
        if let Some(n) = self.devs.get_mut(&id.0) {
            *n -= 1;
            if *n == 0 {
                self.devs.remove(&id.0);
            }
        }
        true
    }
}

fn under_roots(roots: &[PathBuf], path: &Path) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// What `--cold` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    /// Regular files advised out of the page cache.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
    /// Files that could not be opened or advised (logged at debug level).
    pub failed: u64,
}

/// Evicts every regular file under `roots`, and every regular file a symlink under them
/// leads to, from the page cache (`POSIX_FADV_DONTNEED`).
///
/// Pages that are mapped by a running process or dirty stay cached; the kernel decides.
pub(crate) fn evict(roots: &[PathBuf]) -> Evicted {
    let mut done = Evicted::default();
    let mut seen: HashSet<FileId> = HashSet::new();
    for root in roots {
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                let Ok(kind) = entry.file_type() else {
                    continue;
                };
                if kind.is_dir() {
                    stack.push(entry.path());
                } else if kind.is_file() || kind.is_symlink() {
                    // Symlinks count when they lead to a regular file: the program loads
                    // what they point to (libLLVM under /usr/lib/llvm-22/lib, for one).
                    let path = entry.path();
                    if kind.is_symlink() && !std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
                        continue;
                    }
                    match evict_file(&path) {
                        Ok((id, size)) => {
                            if seen.insert(id) {
                                done.files += 1;
                                done.bytes += size;
                            }
                        }
                        Err(err) => {
                            done.failed += 1;
                            tracing::debug!(path = %path.display(), %err, "cannot evict");
                        }
                    }
                }
            }
        }
    }
    done
}

fn evict_file(path: &Path) -> std::io::Result<(FileId, u64)> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    // Dirty pages are not dropped: write them back first (nothing to do for clean files).
    file.sync_data()?;
    // SAFETY: the fd is open for the duration of the call; offset 0 and length 0 mean the
    // whole file.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    Ok(((meta.dev(), meta.ino()), meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(path: &Path) -> FileId {
        let m = std::fs::metadata(path).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn resolves_by_walking_and_by_hints() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        for f in ["a/x", "a/b/y", "z"] {
            std::fs::write(root.join(f), f).unwrap();
        }
        let wanted: HashSet<FileId> = ["a/x", "a/b/y", "z"]
            .iter()
            .map(|f| id(&root.join(f)))
            .chain([(u64::MAX, 1)])
            .collect();
        let known = vec![KnownName {
            id: id(&root.join("z")),
            real: root.join("z"),
            link: root.join("z"),
        }];
        let found = resolve(std::slice::from_ref(&root), &wanted, &known);
        assert_eq!(found.len(), 3);
        assert_eq!(
            found[&id(&root.join("a/b/y"))],
            root.join("a/b/y").to_str().unwrap()
        );
        assert_eq!(
            found[&id(&root.join("z"))],
            root.join("z").to_str().unwrap()
        );
    }

    #[test]
    fn known_paths_outside_roots_are_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("in")).unwrap();
        std::fs::write(root.join("out"), "x").unwrap();
        let out = id(&root.join("out"));
        let wanted: HashSet<FileId> = [out].into_iter().collect();
        let known = [KnownName {
            id: out,
            real: root.join("out"),
            link: root.join("out"),
        }];
        let found = resolve(&[root.join("in")], &wanted, &known);
        assert!(found.is_empty());
    }

    #[test]
    fn symlinks_under_a_root_name_files_outside_it() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(base.join("root/lib")).unwrap();
        std::fs::create_dir_all(base.join("elsewhere")).unwrap();
        std::fs::write(base.join("elsewhere/libx.so.1"), "x").unwrap();
        std::os::unix::fs::symlink("../../elsewhere/libx.so.1", base.join("root/lib/libx.so.1"))
            .unwrap();
        std::fs::write(base.join("root/inside"), "y").unwrap();
        let x = id(&base.join("elsewhere/libx.so.1"));
        let inside = id(&base.join("root/inside"));
        let wanted: HashSet<FileId> = [x, inside].into_iter().collect();
        let found = resolve(&[base.join("root")], &wanted, &[]);
        assert_eq!(found[&x], base.join("root/lib/libx.so.1").to_str().unwrap());
        assert_eq!(found[&inside], base.join("root/inside").to_str().unwrap());
        // With the whole tree as root, the regular file wins over the symlink.
        let found = resolve(std::slice::from_ref(&base), &wanted, &[]);
        assert_eq!(
            found[&x],
            base.join("elsewhere/libx.so.1").to_str().unwrap()
        );
    }

    #[test]
    fn evict_counts_regular_files_once() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), vec![1u8; 5000]).unwrap();
        std::fs::hard_link(dir.path().join("d/f"), dir.path().join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", dir.path().join("s")).unwrap();
        let done = evict(&[dir.path().to_path_buf()]);
        assert_eq!(done.files, 1);
        assert_eq!(done.bytes, 5000);
        assert_eq!(done.failed, 0);
    }
}
