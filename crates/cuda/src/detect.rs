//! Finding a usable GPU without ever touching a library that is not there.
//!
//! cudarc opens each CUDA library by name (`libnvrtc.so`, `libnvrtc.so.13`, ...) and only
//! through the loader's search path. The backend looks further before cudarc's first call:
//!
//! 1. the directories of `DUALPIPE_CUDA_LIBS` (colon-separated), in order;
//! 2. the loader's own search (`LD_LIBRARY_PATH`, `ld.so.cache`, the system directories);
//! 3. where PyTorch's wheels put the libraries: `nvidia/cu13/lib`, `nvidia/cuda_nvrtc/lib`,
//!    `nvidia/cublas/lib` and `nvidia/nccl/lib` under every site-packages directory of the
//!    `python3` on `PATH` (asked once, with a timeout).
//!
//! A library found in a directory is loaded there by its full path, once, for the whole
//! process; cudarc's later open by name then gets that same library, because the loader
//! matches an open library by its `SONAME` (`libnvrtc.so.13`) before it searches any
//! directory. [`LibraryStatus`] records, for each library, the file loaded or every place
//! looked.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::api::GpuInfo;
use crate::error::CudaError;

/// The environment variable naming extra directories to look for the CUDA libraries in
/// (colon-separated), before the loader's search path.
pub const LIBS_VAR: &str = "DUALPIPE_CUDA_LIBS";

/// A shared library the backend loads at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lib {
    /// `libcuda`, the driver (installed with the kernel module, never from a wheel).
    Driver,
    /// `libnvrtc`, which compiles the kernels at run time.
    Nvrtc,
    /// `libcublasLt`, which cuBLAS loads (looked for first, so that a cuBLAS found in a
    /// directory finds it).
    CublasLt,
    /// `libcublas`, the matrix products.
    Cublas,
    /// `libnccl`, needed only by multi-process runs.
    Nccl,
}

impl Lib {
    /// Every library, in the order they are looked for.
    pub const ALL: [Lib; 5] = [
        Lib::Driver,
        Lib::Nvrtc,
        Lib::CublasLt,
        Lib::Cublas,
        Lib::Nccl,
    ];

    /// The library's file name stem (`libnvrtc`).
    pub fn stem(self) -> &'static str {
        match self {
            Lib::Driver => "libcuda",
            Lib::Nvrtc => "libnvrtc",
            Lib::CublasLt => "libcublasLt",
            Lib::Cublas => "libcublas",
            Lib::Nccl => "libnccl",
        }
    }

    /// What it is, in words.
    pub fn role(self) -> &'static str {
        match self {
            Lib::Driver => "the CUDA driver",
            Lib::Nvrtc => "NVRTC",
            Lib::CublasLt => "cuBLASLt",
            Lib::Cublas => "cuBLAS",
            Lib::Nccl => "NCCL",
        }
    }

    /// Whether the backend cannot run on one GPU without it.
    pub fn required(self) -> bool {
        !matches!(self, Lib::Nccl | Lib::CublasLt)
    }

    /// File names tried in each directory, in order (newest major version first).
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so.1", "libcuda.so"],
            Lib::Nvrtc => &["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"],
            Lib::CublasLt => &["libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"],
            Lib::Cublas => &["libcublas.so.13", "libcublas.so.12", "libcublas.so"],
            Lib::Nccl => &["libnccl.so.2", "libnccl.so"],
        }
    }

    /// Names asked of the loader, in cudarc's order (the unversioned name first), so that
    /// the library loaded here is the one cudarc's own search would pick.
    pub fn loader_names(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &["libcuda.so", "libcuda.so.1"],
            Lib::Nvrtc => &["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"],
            Lib::CublasLt => &["libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12"],
            Lib::Cublas => &["libcublas.so", "libcublas.so.13", "libcublas.so.12"],
            Lib::Nccl => &["libnccl.so", "libnccl.so.2"],
        }
    }

    /// Where Python wheels install it, relative to a site-packages directory.
    pub fn wheel_dirs(self) -> &'static [&'static str] {
        match self {
            Lib::Driver => &[],
            Lib::Nvrtc => &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"],
            Lib::CublasLt | Lib::Cublas => &["nvidia/cu13/lib", "nvidia/cublas/lib"],
            Lib::Nccl => &["nvidia/nccl/lib"],
        }
    }

    /// Files of the same directory loaded just before it, found by name prefix: NVRTC opens
    /// its builtins library by name when it compiles.
    pub fn companion_prefix(self) -> Option<&'static str> {
        match self {
            Lib::Nvrtc => Some("libnvrtc-builtins.so"),
            _ => None,
        }
    }
}

/// Where a library was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// A directory of `DUALPIPE_CUDA_LIBS`.
    EnvVar,
    /// The loader's search path.
    Loader,
    /// A Python wheel's directory under site-packages.
    Python,
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::EnvVar => LIBS_VAR,
            Source::Loader => "the loader's search path",
            Source::Python => "Python site-packages",
        })
    }
}

/// What became of the search for one library.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LibraryStatus {
    /// Which library.
    pub lib: Lib,
    /// The file loaded and how it was found; `None` when not found.
    pub found: Option<(PathBuf, Source)>,
    /// Every place looked, in order.
    pub looked: Vec<String>,
    /// Files that exist but could not be loaded, with the loader's message.
    pub failures: Vec<String>,
    /// Whether the library is reachable where it is called from: cudarc opens the driver,
    /// NVRTC and cuBLAS by name (and gets the loaded library when its `SONAME` is among the
    /// names it tries); cuBLASLt (opened by cuBLAS) and NCCL (opened by the backend from the
    /// path found) are reachable once found.
    pub reachable: bool,
    /// Other files of the same library mapped into the process (two different copies
    /// loaded side by side), when any.
    pub also_mapped: Vec<PathBuf>,
}

impl LibraryStatus {
    /// Why the library cannot be used, naming it and where it was looked for; `None` when
    /// it can.
    pub fn problem(&self) -> Option<String> {
        let lib = self.lib;
        match &self.found {
            Some(_) if self.reachable => None,
            Some((path, _)) => Some(format!(
                "{} was found at {}, but cudarc does not reach it: cudarc opens it only by \
                 the names {}, and that file is known to the loader by another; put a \
                 library of one of those names on the loader's search path",
                lib.role(),
                path.display(),
                lib.loader_names().join(", ")
            )),
            None => {
                let mut text = format!(
                    "{} ({}.so) was not found; looked in: {}",
                    lib.role(),
                    lib.stem(),
                    self.looked.join("; ")
                );
                if !self.failures.is_empty() {
                    text.push_str(&format!(
                        "; found but failed to load: {}",
                        self.failures.join("; ")
                    ));
                }
                text.push_str(&format!(
                    " ({LIBS_VAR} can name the directory that holds it)"
                ));
                Some(text)
            }
        }
    }
}

impl std::fmt::Display for LibraryStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.found, self.problem()) {
            (Some((path, source)), None) => {
                write!(f, "{}: {} (from {source})", self.lib.stem(), path.display())?;
                for other in &self.also_mapped {
                    write!(f, "; also loaded: {}", other.display())?;
                }
                Ok(())
            }
            (_, Some(problem)) => write!(f, "{}: {problem}", self.lib.stem()),
            (None, None) => write!(f, "{}: not found", self.lib.stem()),
        }
    }
}

/// A place to try, as [`find`] hands it to its opener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    /// An existing file, loaded by its full path.
    File(PathBuf),
    /// A name for the loader to search for.
    Name(&'static str),
}

/// The directories of a `DUALPIPE_CUDA_LIBS` value, empty entries skipped.
pub fn env_dirs(value: Option<&OsStr>) -> Vec<PathBuf> {
    value
        .map(|v| {
            std::env::split_paths(v)
                .filter(|p| !p.as_os_str().is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Looks for `lib`: in `env_dirs`, then by name through the loader, then in the wheel
/// directories under the site-packages directories `python` lists (asked only if needed).
/// `open` loads a candidate and returns the file it loaded, or the loader's message.
pub fn find(
    lib: Lib,
    env_dirs: &[PathBuf],
    python: &mut dyn FnMut() -> Result<Vec<PathBuf>, String>,
    open: &mut dyn FnMut(Lib, &Candidate) -> Result<PathBuf, String>,
) -> LibraryStatus {
    let mut status = LibraryStatus {
        lib,
        found: None,
        looked: Vec::new(),
        failures: Vec::new(),
        reachable: false,
        also_mapped: Vec::new(),
    };
    for dir in env_dirs {
        if look_in(&mut status, dir, Source::EnvVar, open) {
            return status;
        }
    }
    status.looked.push(format!(
        "the loader's search path (LD_LIBRARY_PATH, ld.so.cache, system directories) as {}",
        lib.loader_names().join(", ")
    ));
    for name in lib.loader_names() {
        match open(lib, &Candidate::Name(name)) {
            Ok(loaded) => {
                status.found = Some((loaded, Source::Loader));
                return status;
            }
            // Not there is the usual answer; anything else (a dependency missing, a file of
            // the wrong kind) is worth telling.
            Err(e) if e.starts_with(&format!("{name}: cannot open shared object file")) => {}
            Err(e) => status.failures.push(format!("{name} (by the loader): {e}")),
        }
    }
    if lib.wheel_dirs().is_empty() {
        return status;
    }
    match python() {
        Ok(site_packages) => {
            if site_packages.is_empty() {
                status
                    .looked
                    .push("Python site-packages (python3 listed none)".into());
            }
            for sp in &site_packages {
                for sub in lib.wheel_dirs() {
                    if look_in(&mut status, &sp.join(sub), Source::Python, open) {
                        return status;
                    }
                }
            }
        }
        Err(why) => status.looked.push(format!("Python site-packages ({why})")),
    }
    status
}

/// Tries `lib`'s file names in `dir`; true when one loaded.
fn look_in(
    status: &mut LibraryStatus,
    dir: &Path,
    source: Source,
    open: &mut dyn FnMut(Lib, &Candidate) -> Result<PathBuf, String>,
) -> bool {
    let lib = status.lib;
    status.looked.push(match source {
        Source::EnvVar => format!("{} ({LIBS_VAR})", dir.display()),
        _ => dir.display().to_string(),
    });
    for name in lib.file_names() {
        let path = dir.join(name);
        if !path.is_file() {
            continue;
        }
        match open(lib, &Candidate::File(path.clone())) {
            Ok(loaded) => {
                status.found = Some((loaded, source));
                return true;
            }
            Err(e) if e.contains(&path.display().to_string()) => status.failures.push(e),
            Err(e) => status.failures.push(format!("{}: {e}", path.display())),
        }
    }
    false
}

/// The files mapped into a process whose name starts with `prefix`, from the text of
/// `/proc/self/maps`, each once, in order of first appearance.
pub fn mapped_files(maps: &str, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode path (the path may contain spaces)
        let Some(path) = line.splitn(6, ' ').nth(5).map(str::trim) else {
            continue;
        };
        let path = Path::new(path);
        let named = path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|n| n.starts_with(prefix));
        if path.is_absolute() && named && !files.iter().any(|f| f == path) {
            files.push(path.to_path_buf());
        }
    }
    files
}

/// The files of `lib` mapped into this process now (empty where `/proc` cannot be read).
pub fn mapped_now(lib: Lib) -> Vec<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    mapped_files(&maps, &format!("{}.so", lib.stem()))
}

/// The files in `dir` whose names start with `prefix`, sorted.
pub fn files_with_prefix(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.file_name()
                    .and_then(OsStr::to_str)
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .collect();
    files.sort();
    files
}

/// Runs `command` and returns its standard output, or why not: it could not start, failed,
/// or ran longer than `timeout` (then it is killed).
pub fn output_within(mut command: Command, timeout: Duration) -> Result<String, String> {
    use std::io::Read;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start it: {e}"))?;
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if start.elapsed() >= timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("no answer within {} s", timeout.as_secs_f64()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => return Err(format!("waiting for it failed: {e}")),
        }
    };
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        stdout
            .read_to_string(&mut out)
            .map_err(|e| format!("its output could not be read: {e}"))?;
    }
    if !status.success() {
        return Err(format!("it exited with {status}"));
    }
    Ok(out)
}

/// The site-packages directories of the `python3` on `PATH` (system, user and the active
/// virtual environment's), asked with a timeout of five seconds.
pub fn python_site_packages() -> Result<Vec<PathBuf>, String> {
    let mut command = Command::new("python3");
    command.args([
        "-c",
        "import site\nfor p in site.getsitepackages() + [site.getusersitepackages()]: print(p)",
    ]);
    let out =
        output_within(command, Duration::from_secs(5)).map_err(|e| format!("python3: {e}"))?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(PathBuf::from)
        .collect())
}

/// Why the driver could not list its devices.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceQueryError {
    /// There is no device to use (`CUDA_ERROR_NO_DEVICE`, or a stub driver library): the
    /// machine has no GPU.
    Absent(String),
    /// Any other failure: a GPU machine whose driver does not work.
    Failed(String),
}

/// Decides from the libraries found whether the backend can run; `devices` is the driver's
/// device count (or its error), asked only when the driver library exists.
///
/// No driver library or no device is "no GPU" ([`CudaError::NoGpu`], which tests skip on); a
/// driver that fails otherwise, or a device with NVRTC or cuBLAS missing, is a failure that
/// names the library and every place it was looked for ([`CudaError::Device`],
/// [`CudaError::Library`]).
pub fn diagnose(
    libraries: &[LibraryStatus],
    devices: impl FnOnce() -> Result<usize, DeviceQueryError>,
    ordinal: usize,
) -> Result<usize, CudaError> {
    let status = |lib: Lib| libraries.iter().find(|s| s.lib == lib);
    match status(Lib::Driver) {
        None => {
            return Err(CudaError::NoGpu(
                "the CUDA driver (libcuda.so) was not looked for".into(),
            ));
        }
        Some(driver) => {
            if let Some(problem) = driver.problem() {
                return Err(CudaError::NoGpu(problem));
            }
        }
    }
    let count = devices().map_err(|e| match e {
        DeviceQueryError::Absent(e) => CudaError::NoGpu(format!("the CUDA driver reports {e}")),
        DeviceQueryError::Failed(e) => CudaError::Device(format!(
            "the CUDA driver is installed but does not work: it reports {e}"
        )),
    })?;
    if count == 0 {
        return Err(CudaError::NoGpu("the CUDA driver sees no device".into()));
    }
    if ordinal >= count {
        return Err(CudaError::NoGpu(format!(
            "GPU {ordinal} was asked for, but the driver sees {count} (0 to {})",
            count - 1
        )));
    }
    for lib in [Lib::Nvrtc, Lib::Cublas] {
        let problem = match status(lib) {
            None => Some(format!(
                "{} ({}.so) was not looked for",
                lib.role(),
                lib.stem()
            )),
            Some(s) => s.problem(),
        };
        if let Some(problem) = problem {
            return Err(CudaError::Library(problem));
        }
    }
    Ok(count)
}

/// What `dualpipe gpu-info` shows: every library with where it was found or looked for, the
/// driver's version and the devices (or why none can be used).
#[derive(Debug)]
pub struct Report {
    /// Each library of [`Lib::ALL`], in that order (empty without the `cuda` feature).
    pub libraries: Vec<LibraryStatus>,
    /// The CUDA version the driver supports (major, minor), when the driver answered.
    pub driver_version: Option<(i32, i32)>,
    /// Every GPU the driver sees, or why the backend cannot use one.
    pub devices: Result<Vec<GpuInfo>, CudaError>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(lib: Lib) -> LibraryStatus {
        LibraryStatus {
            lib,
            found: Some((
                PathBuf::from(format!("/x/{}.so", lib.stem())),
                Source::Loader,
            )),
            looked: vec!["the loader".into()],
            failures: Vec::new(),
            reachable: true,
            also_mapped: Vec::new(),
        }
    }

    fn missing(lib: Lib) -> LibraryStatus {
        LibraryStatus {
            found: None,
            looked: vec!["/a (DUALPIPE_CUDA_LIBS)".into(), "/b".into()],
            reachable: false,
            ..found(lib)
        }
    }

    fn all() -> Vec<LibraryStatus> {
        Lib::ALL.iter().map(|&lib| found(lib)).collect()
    }

    fn with(lib: Lib, status: LibraryStatus) -> Vec<LibraryStatus> {
        all()
            .into_iter()
            .map(|s| if s.lib == lib { status.clone() } else { s })
            .collect()
    }

    fn reason(libs: &[LibraryStatus], devices: Result<usize, DeviceQueryError>) -> CudaError {
        diagnose(libs, || devices, 0).unwrap_err()
    }

    #[test]
    fn no_driver_or_no_device_is_no_gpu() {
        assert_eq!(diagnose(&all(), || Ok(2), 1), Ok(2));
        let error = diagnose(
            &with(Lib::Driver, missing(Lib::Driver)),
            || panic!("the driver must not be asked"),
            0,
        )
        .unwrap_err();
        assert!(error.is_no_gpu());
        assert_eq!(
            error.to_string(),
            "no GPU found: the CUDA driver (libcuda.so) was not found; looked in: \
             /a (DUALPIPE_CUDA_LIBS); /b (DUALPIPE_CUDA_LIBS can name the directory that \
             holds it)"
        );
        let absent = reason(
            &all(),
            Err(DeviceQueryError::Absent("CUDA_ERROR_NO_DEVICE".into())),
        );
        assert!(absent.is_no_gpu());
        assert_eq!(
            absent.to_string(),
            "no GPU found: the CUDA driver reports CUDA_ERROR_NO_DEVICE"
        );
        assert_eq!(
            reason(&all(), Ok(0)).to_string(),
            "no GPU found: the CUDA driver sees no device"
        );
        assert_eq!(
            diagnose(&all(), || Ok(2), 2).unwrap_err().to_string(),
            "no GPU found: GPU 2 was asked for, but the driver sees 2 (0 to 1)"
        );
    }

    #[test]
    fn a_broken_driver_or_a_missing_library_is_a_failure_naming_it() {
        let broken = reason(
            &all(),
            Err(DeviceQueryError::Failed(
                "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH".into(),
            )),
        );
        assert!(!broken.is_no_gpu());
        assert!(
            broken
                .to_string()
                .contains("CUDA_ERROR_SYSTEM_DRIVER_MISMATCH"),
            "{broken}"
        );
        for lib in [Lib::Nvrtc, Lib::Cublas] {
            let error = reason(&with(lib, missing(lib)), Ok(1));
            assert!(!error.is_no_gpu(), "{error}");
            assert_eq!(
                error.to_string(),
                format!(
                    "a GPU is present, but {} ({}.so) was not found; looked in: \
                     /a (DUALPIPE_CUDA_LIBS); /b (DUALPIPE_CUDA_LIBS can name the \
                     directory that holds it)",
                    lib.role(),
                    lib.stem()
                )
            );
        }
        let mut failed = missing(Lib::Nvrtc);
        failed.failures = vec!["/a/libnvrtc.so.13: wrong ELF class".into()];
        let error = reason(&with(Lib::Nvrtc, failed), Ok(1)).to_string();
        assert!(
            error.contains("; found but failed to load: /a/libnvrtc.so.13: wrong ELF class ("),
            "{error}"
        );
        for lib in [Lib::Nccl, Lib::CublasLt] {
            assert_eq!(
                diagnose(&with(lib, missing(lib)), || Ok(1), 0),
                Ok(1),
                "{lib:?} is not needed on one GPU"
            );
        }
    }

    #[test]
    fn a_library_cudarc_cannot_open_is_found_but_says_so() {
        let status = LibraryStatus {
            found: Some((PathBuf::from("/sp/lib/libnvrtc.so.13"), Source::Python)),
            reachable: false,
            ..found(Lib::Nvrtc)
        };
        assert_eq!(
            status.problem().unwrap(),
            "NVRTC was found at /sp/lib/libnvrtc.so.13, but cudarc does not reach it: cudarc \
             opens it only by the names libnvrtc.so, libnvrtc.so.13, libnvrtc.so.12, and that \
             file is known to the loader by another; put a library of one of those names on \
             the loader's search path"
        );
        assert_eq!(
            found(Lib::Cublas).to_string(),
            "libcublas: /x/libcublas.so (from the loader's search path)"
        );
    }

    /// A scratch directory, removed when dropped.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("dualpipe-detect-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn file(&self, relative: &str) -> PathBuf {
            let path = self.0.join(relative);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, b"").unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The loader's answer for a name it does not have.
    fn absent(name: &str) -> String {
        format!("{name}: cannot open shared object file: No such file or directory")
    }

    #[test]
    fn the_search_goes_env_then_loader_then_python_wheels() {
        let scratch = Scratch::new("order");
        let env = scratch.0.join("env");
        let sp = scratch.0.join("site-packages");
        let wheel = scratch.file("site-packages/nvidia/cu13/lib/libnvrtc.so.13");
        let broken = scratch.file("env/libnvrtc.so.12");
        let mut tried = Vec::new();
        let mut python_asked = 0;
        let status = find(
            Lib::Nvrtc,
            std::slice::from_ref(&env),
            &mut || {
                python_asked += 1;
                Ok(vec![sp.clone()])
            },
            &mut |_, candidate| {
                tried.push(candidate.clone());
                match candidate {
                    Candidate::File(p) if *p == wheel => Ok(p.clone()),
                    Candidate::File(_) => Err("wrong ELF class".into()),
                    Candidate::Name(name) => Err(absent(name)),
                }
            },
        );
        assert_eq!(status.found, Some((wheel.clone(), Source::Python)));
        assert_eq!(python_asked, 1);
        assert_eq!(
            tried,
            vec![
                Candidate::File(broken.clone()),
                Candidate::Name("libnvrtc.so"),
                Candidate::Name("libnvrtc.so.13"),
                Candidate::Name("libnvrtc.so.12"),
                Candidate::File(wheel.clone()),
            ]
        );
        assert_eq!(
            status.failures,
            vec![format!("{}: wrong ELF class", broken.display())]
        );
        assert_eq!(status.looked.len(), 3, "{:?}", status.looked);
        assert!(status.looked[0].ends_with("env (DUALPIPE_CUDA_LIBS)"));

        // A library the loader has but cannot load is named with the loader's reason.
        let status = find(
            Lib::Cublas,
            &[],
            &mut || Ok(Vec::new()),
            &mut |_, candidate| match candidate {
                Candidate::Name("libcublas.so.13") => Err(
                    "libcublasLt.so.13: cannot open shared object file: No such file or directory"
                        .into(),
                ),
                Candidate::Name(name) => Err(absent(name)),
                Candidate::File(_) => Err("no".into()),
            },
        );
        assert_eq!(
            status.failures,
            vec![
                "libcublas.so.13 (by the loader): libcublasLt.so.13: cannot open shared object \
                 file: No such file or directory"
                    .to_string()
            ]
        );

        // Found by the loader: Python is never asked.
        let mut python_asked = false;
        let status = find(
            Lib::Cublas,
            &[],
            &mut || {
                python_asked = true;
                Ok(Vec::new())
            },
            &mut |_, candidate| match candidate {
                Candidate::Name("libcublas.so.13") => Ok(PathBuf::from("/usr/lib/libcublas.so.13")),
                _ => Err("no".into()),
            },
        );
        assert_eq!(
            status.found,
            Some((PathBuf::from("/usr/lib/libcublas.so.13"), Source::Loader))
        );
        assert!(!python_asked);

        // Nowhere: every place is listed, and a Python that cannot answer says why.
        let status = find(
            Lib::Nccl,
            std::slice::from_ref(&env),
            &mut || Err("python3: could not start it".into()),
            &mut |_, candidate| match candidate {
                Candidate::Name(name) => Err(absent(name)),
                Candidate::File(_) => Err("no".into()),
            },
        );
        assert_eq!(status.found, None);
        let problem = status.problem().unwrap();
        assert!(problem.starts_with("NCCL (libnccl.so) was not found; looked in: "));
        assert!(problem.contains("env (DUALPIPE_CUDA_LIBS); the loader's search path"));
        assert!(problem.contains("; Python site-packages (python3: could not start it) ("));

        // The driver never comes from a wheel.
        let status = find(
            Lib::Driver,
            &[],
            &mut || panic!("python must not be asked for the driver"),
            &mut |_, candidate| match candidate {
                Candidate::Name(name) => Err(absent(name)),
                Candidate::File(_) => Err("no".into()),
            },
        );
        assert_eq!(status.looked.len(), 1);
    }

    #[test]
    fn env_dirs_skip_empty_entries() {
        assert_eq!(
            env_dirs(Some(OsStr::new("/a::/b/c:"))),
            vec![PathBuf::from("/a"), PathBuf::from("/b/c")]
        );
        assert!(env_dirs(None).is_empty());
        assert!(env_dirs(Some(OsStr::new(""))).is_empty());
    }

    #[test]
    fn mapped_files_are_read_from_proc_maps() {
        let maps = "\
7f00-7f01 r--p 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f01-7f02 r-xp 00001000 08:01 1 /usr/lib/x86_64-linux-gnu/libcuda.so.580.1
7f02-7f03 r--p 00000000 08:01 2 /opt/my libs/libcublasLt.so.13
7f03-7f04 r--p 00000000 08:01 3 /opt/x/libcublas.so.13
7f04-7f05 rw-p 00000000 00:00 0 [heap]
7f05-7f06 rw-p 00000000 00:00 0
";
        assert_eq!(
            mapped_files(maps, "libcuda.so"),
            vec![PathBuf::from("/usr/lib/x86_64-linux-gnu/libcuda.so.580.1")]
        );
        assert_eq!(
            mapped_files(maps, "libcublas.so"),
            vec![PathBuf::from("/opt/x/libcublas.so.13")]
        );
        assert_eq!(
            mapped_files(maps, "libcublasLt.so"),
            vec![PathBuf::from("/opt/my libs/libcublasLt.so.13")]
        );
        assert!(mapped_files(maps, "libnccl.so").is_empty());
    }

    #[test]
    fn companions_are_found_by_prefix() {
        let scratch = Scratch::new("companions");
        let builtins = scratch.file("libnvrtc-builtins.so.13.0");
        scratch.file("libnvrtc.so.13");
        assert_eq!(
            files_with_prefix(&scratch.0, Lib::Nvrtc.companion_prefix().unwrap()),
            vec![builtins]
        );
        assert!(files_with_prefix(&scratch.0.join("absent"), "lib").is_empty());
    }

    #[test]
    fn a_command_that_hangs_is_killed_and_one_that_fails_says_so() {
        let start = Instant::now();
        let mut sleep = Command::new("sleep");
        sleep.arg("10");
        let error = output_within(sleep, Duration::from_millis(200)).unwrap_err();
        assert!(error.starts_with("no answer within 0.2 s"), "{error}");
        assert!(start.elapsed() < Duration::from_secs(5));
        let error = output_within(Command::new("/nonexistent/python3"), Duration::from_secs(5))
            .unwrap_err();
        assert!(error.starts_with("could not start it: "), "{error}");
        let error = output_within(Command::new("false"), Duration::from_secs(5)).unwrap_err();
        assert!(error.starts_with("it exited with "), "{error}");
        let mut echo = Command::new("echo");
        echo.arg("/a/site-packages");
        assert_eq!(
            output_within(echo, Duration::from_secs(5)).unwrap(),
            "/a/site-packages\n"
        );
    }
}
