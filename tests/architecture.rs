//! `ARCHITECTURE.md`'s module table is the contract for which module may import which: this reads the
//! table and every source file, and fails on an import the table does not allow (or a module it does not
//! list), so the document stays true.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Module name → the modules it may call (`None`: any).
fn allowed_calls() -> BTreeMap<String, Option<BTreeSet<String>>> {
    let text = std::fs::read_to_string(root().join("ARCHITECTURE.md")).expect("ARCHITECTURE.md");
    let table = text.split("## Modules").nth(1).expect("a Modules section");
    let mut rows = BTreeMap::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split(" | ").collect();
        let module = cells[0]
            .trim_start_matches("| ")
            .trim_matches('`')
            .to_string();
        let calls = cells.last().expect("cells").trim_end_matches(" |").trim();
        let allowed = if calls.starts_with("everything") {
            None
        } else {
            Some(
                calls
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|name| name.split("::").next().unwrap_or(name).to_string())
                    .collect(),
            )
        };
        rows.insert(module, allowed);
    }
    rows
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file under `src/` belongs to (`None` for `lib.rs` and `main.rs`).
fn module_of(file: &Path) -> Option<String> {
    let relative = file.strip_prefix(root().join("src")).ok()?;
    let first = relative.components().next()?.as_os_str().to_string_lossy();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// The `crate::x` modules a file refers to, outside its unit tests.
fn crate_references(file: &Path) -> BTreeSet<String> {
    let text = std::fs::read_to_string(file).expect("source");
    let code = text.split("#[cfg(test)]").next().unwrap_or(&text);
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        if !name.is_empty() {
            found.insert(name);
        }
    }
    found
}

#[test]
fn imports_follow_the_module_table() {
    let table = allowed_calls();
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut violations = Vec::new();
    let mut modules = BTreeSet::new();
    for file in &files {
        let Some(module) = module_of(file) else {
            continue;
        };
        modules.insert(module.clone());
        let Some(allowed) = table.get(&module) else {
            violations.push(format!(
                "`{module}` is not in ARCHITECTURE.md's module table"
            ));
            continue;
        };
        let Some(allowed) = allowed else { continue };
        for used in crate_references(file) {
            if used != module && !allowed.contains(&used) {
                violations.push(format!(
                    "{}: `{module}` uses `{used}`, which its row does not allow",
                    file.strip_prefix(root()).unwrap_or(file).display()
                ));
            }
        }
    }
    for listed in table.keys() {
        if !modules.contains(listed) {
            violations.push(format!(
                "ARCHITECTURE.md lists `{listed}`, which does not exist"
            ));
        }
    }
    assert!(violations.is_empty(), "{}", violations.join("\n"));
    assert!(table.len() >= 10, "the table was not read: {table:?}");
}
