//! tracefs: finding (or mounting) it, and reading tracepoint record layouts from its
//! `events/CATEGORY/NAME/format` files into the probe's [`Config`].

use std::ffi::CString;
use std::path::{Path, PathBuf};

use incfs_common::Config;

use crate::RecordError;

/// Where tracefs is mounted on current kernels.
pub(crate) const TRACEFS: &str = "/sys/kernel/tracing";
/// Where older setups expose it (inside debugfs).
const TRACEFS_IN_DEBUGFS: &str = "/sys/kernel/debug/tracing";

/// Returns the tracefs directory, mounting tracefs at [`TRACEFS`] when it is not mounted.
pub(crate) fn ensure_mounted() -> Result<PathBuf, RecordError> {
    for dir in [TRACEFS, TRACEFS_IN_DEBUGFS] {
        if Path::new(dir).join("events").is_dir() {
            return Ok(PathBuf::from(dir));
        }
    }
    tracing::info!(path = TRACEFS, "tracefs is not mounted; mounting it");
    let target = CString::new(TRACEFS).map_err(|_| RecordError::Tracefs {
        path: TRACEFS.into(),
        source: std::io::Error::other("path contains NUL"),
    })?;
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call;
    // data may be null for tracefs.
    let rc = unsafe {
        libc::mount(
            c"nodev".as_ptr(),
            target.as_ptr(),
            c"tracefs".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(RecordError::Tracefs {
            path: TRACEFS.into(),
            source: std::io::Error::last_os_error(),
        });
    }
    if !Path::new(TRACEFS).join("events").is_dir() {
        return Err(RecordError::Tracefs {
            path: TRACEFS.into(),
            source: std::io::Error::other("mounted tracefs has no events/ directory"),
        });
    }
    Ok(PathBuf::from(TRACEFS))
}

/// One `field:` line of a format file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Field {
    /// The field's name (array suffix removed).
    pub name: String,
    /// Offset in bytes from the start of the record.
    pub offset: u32,
    /// Size in bytes.
    pub size: u32,
}

/// The fields of one tracepoint, as its format file lists them.
#[derive(Debug, Clone)]
pub(crate) struct Format {
    path: PathBuf,
    fields: Vec<Field>,
}

impl Format {
    /// Reads `TRACEFS/events/CATEGORY/NAME/format`.
    pub(crate) fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self, RecordError> {
        let path = tracefs
            .join("events")
            .join(category)
            .join(name)
            .join("format");
        let text = std::fs::read_to_string(&path).map_err(|source| RecordError::Io {
            what: "cannot read the tracepoint format file (is the tracepoint in this kernel?)",
            path: path.clone(),
            source,
        })?;
        Ok(Self::parse(path, &text))
    }

    /// Parses the text of a format file.
    pub(crate) fn parse(path: PathBuf, text: &str) -> Self {
        let fields = text.lines().filter_map(parse_field).collect();
        Format { path, fields }
    }

    /// The offset of `name`, checking its size is one of `sizes`.
    pub(crate) fn offset(&self, name: &str, sizes: &[u32]) -> Result<u32, RecordError> {
        match self.optional(name, sizes)? {
            Some(offset) => Ok(offset),
            None => Err(RecordError::Format {
                path: self.path.clone(),
                what: format!("has no field `{name}`"),
            }),
        }
    }

    /// Like [`Format::offset`], but `Ok(None)` when the field does not exist.
    pub(crate) fn optional(&self, name: &str, sizes: &[u32]) -> Result<Option<u32>, RecordError> {
        let Some(field) = self.fields.iter().find(|f| f.name == name) else {
            return Ok(None);
        };
        if !sizes.contains(&field.size) {
            return Err(RecordError::Format {
                path: self.path.clone(),
                what: format!(
                    "field `{name}` is {} bytes, the probe reads {sizes:?}",
                    field.size
                ),
            });
        }
        Ok(Some(field.offset))
    }
}

/// Parses `\tfield:unsigned long i_ino;\toffset:8;\tsize:8;\tsigned:0;`.
fn parse_field(line: &str) -> Option<Field> {
    let line = line.trim();
    let decl = line.strip_prefix("field:")?;
    let mut parts = decl.split(';').map(str::trim);
    let decl = parts.next()?;
    let mut offset = None;
    let mut size = None;
    for part in parts {
        if let Some(v) = part.strip_prefix("offset:") {
            offset = v.parse().ok();
        } else if let Some(v) = part.strip_prefix("size:") {
            size = v.parse().ok();
        }
    }
    let name = decl.rsplit([' ', '*']).next()?;
    let name = name.split('[').next()?.to_owned();
    Some(Field {
        name,
        offset: offset?,
        size: size?,
    })
}

/// The probe's configuration for this kernel, read from the format files.
pub(crate) fn probe_config(
    tracefs: &Path,
    trace_opens: bool,
    wakeup_bytes: u32,
) -> Result<Config, RecordError> {
    const U64: &[u32] = &[8];
    const U32: &[u32] = &[4];
    const U8: &[u32] = &[1];
    let fault = Format::read(tracefs, "filemap", "mm_filemap_fault")?;
    let map = Format::read(tracefs, "filemap", "mm_filemap_map_pages")?;
    let get = Format::read(tracefs, "filemap", "mm_filemap_get_pages")?;
    let add = Format::read(tracefs, "filemap", "mm_filemap_add_to_page_cache")?;
    let fork = Format::read(tracefs, "sched", "sched_process_fork")?;
    let exec = Format::read(tracefs, "sched", "sched_process_exec")?;
    let exit = Format::read(tracefs, "sched", "sched_process_exit")?;
    let openat = Format::read(tracefs, "syscalls", "sys_enter_openat")?;
    Ok(Config {
        fault_ino: fault.offset("i_ino", U64)?,
        fault_dev: fault.offset("s_dev", U32)?,
        fault_index: fault.offset("index", U64)?,
        map_pages_ino: map.offset("i_ino", U64)?,
        map_pages_dev: map.offset("s_dev", U32)?,
        map_pages_index: map.offset("index", U64)?,
        map_pages_last: map.offset("last_index", U64)?,
        get_pages_ino: get.offset("i_ino", U64)?,
        get_pages_dev: get.offset("s_dev", U32)?,
        get_pages_index: get.offset("index", U64)?,
        get_pages_last: get.offset("last_index", U64)?,
        add_ino: add.offset("i_ino", U64)?,
        add_dev: add.offset("s_dev", U32)?,
        add_index: add.offset("index", U64)?,
        add_order: add.optional("order", U8)?.unwrap_or(Config::ABSENT),
        fork_child_pid: fork.offset("child_pid", U32)?,
        exec_filename: exec.offset("filename", U32)?,
        exit_pid: exit.offset("pid", U32)?,
        exit_group_dead: exit.optional("group_dead", U8)?.unwrap_or(Config::ABSENT),
        openat_dfd: openat.offset("dfd", U64)?,
        openat_filename: openat.offset("filename", U64)?,
        trace_opens: u32::from(trace_opens),
        wakeup_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADD_TO_PAGE_CACHE: &str = "name: mm_filemap_add_to_page_cache
ID: 512
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long pfn;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long i_ino;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long index;\toffset:24;\tsize:8;\tsigned:0;
\tfield:dev_t s_dev;\toffset:32;\tsize:4;\tsigned:0;
\tfield:unsigned char order;\toffset:36;\tsize:1;\tsigned:0;

print fmt: \"dev %d:%d ino %lx\", REC->s_dev
";

    #[test]
    fn parses_offsets_and_sizes() {
        let f = Format::parse("x".into(), ADD_TO_PAGE_CACHE);
        assert_eq!(f.offset("i_ino", &[8]).ok(), Some(16));
        assert_eq!(f.offset("s_dev", &[4]).ok(), Some(32));
        assert_eq!(f.offset("order", &[1]).ok(), Some(36));
        assert_eq!(f.offset("common_pid", &[4]).ok(), Some(4));
    }

    #[test]
    fn missing_field_and_wrong_size_are_errors() {
        let f = Format::parse("x".into(), ADD_TO_PAGE_CACHE);
        assert!(f.offset("last_index", &[8]).is_err());
        assert!(matches!(f.optional("last_index", &[8]), Ok(None)));
        let err = f.offset("s_dev", &[8]).unwrap_err().to_string();
        assert!(err.contains("s_dev") && err.contains("4 bytes"), "{err}");
    }

    #[test]
    fn parses_arrays_pointers_and_data_loc() {
        let text = "\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;
\tfield:const char * filename;\toffset:24;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;";
        let f = Format::parse("x".into(), text);
        assert_eq!(f.offset("comm", &[16]).ok(), Some(8));
        assert_eq!(f.offset("filename", &[8]).ok(), Some(24));
        assert_eq!(f.offset("parent_comm", &[4]).ok(), Some(8));
    }
}
