//! Libraries loaded at run time (cuFile, NCCL): the first of a list of names that loads, kept
//! for the rest of the process, and its symbols bound with the reason when one is missing.

use libloading::Library;

/// Loads the first of `names` that loads and leaks it: libraries like these start threads of
/// their own, and unloading one under them would crash the process. Else every name's reason.
pub(crate) fn load_first(names: impl IntoIterator<Item = String>) -> Result<(String, &'static Library), String> {
    let mut reasons = Vec::new();
    for name in names {
        // SAFETY: loading runs the library's initialisers: those of NVIDIA's libraries, which
        // every user of them (torch among them) runs, and which touch nothing of this process's.
        match unsafe { Library::new(&name) } {
            Ok(library) => return Ok((name, Box::leak(Box::new(library)))),
            Err(e) => reasons.push(reason(&e, &name)),
        }
    }
    Err(reasons.join("; "))
}

/// `symbol` of `library` as a `T`.
///
/// # Safety
/// `T` must be the symbol's C signature as the library's header declares it.
pub(crate) unsafe fn bind<T: Copy>(library: &'static Library, symbol: &str) -> Result<T, String> {
    // SAFETY: the caller vouches for `T`; the library is never unloaded (see `load_first`), so
    // the pointer stays valid.
    unsafe { library.get::<T>(symbol) }.map(|bound| *bound).map_err(|e| reason(&e, symbol))
}

/// dlerror's message where there is one (it names the library or symbol), else `e` with `what`.
fn reason(e: &libloading::Error, what: &str) -> String {
    match std::error::Error::source(e) {
        Some(source) => source.to_string(),
        None => format!("{what}: {e}"),
    }
}
