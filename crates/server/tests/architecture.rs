//! The server crate's shape, checked: no source file grows past
//! [`MAX_LINES`], the top-level modules reference each other without a
//! cycle, and the layering rules below hold.
//!
//! The module graph is read from the source text, not from the compiler:
//! an edge `a -> b` is any `crate::b` path (in a `use` or inline, grouped
//! `crate::{b, c}` included) in a file of module `a`, once comments and
//! string literals are stripped. Test code counts like any other code.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The most lines a source file may have. A file past this is doing
/// several things; split it along its seams.
const MAX_LINES: usize = 600;

/// Which modules a module must not reference, and why.
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "pools",
        &["syncs", "boosts", "tenancy", "api", "metrics"],
        "pools is the core state machine; the features above it plug in through its traits",
    ),
    (
        "agents",
        &["pools", "tenancy"],
        "agents is transport: sessions and commands, no pool policy",
    ),
    (
        "store",
        &["pools", "syncs", "boosts", "tenancy", "api"],
        "store is persistence only; the machinery above it calls down, never the reverse",
    ),
];

/// The only modules that may reference `api`: it is the outermost layer.
const API_USERS: &[&str] = &["api", "server"];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, sorted.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("read {}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `text` with comments, string literals and char literals blanked out
/// (newlines kept). Rough, but enough for paths: raw strings, nested block
/// comments, escapes and lifetimes are handled.
fn strip(text: &str) -> String {
    let c: Vec<char> = text.chars().collect();
    let at = |j: usize| c.get(j).copied().unwrap_or('\0');
    let blank = |out: &mut String, ch: char| out.push(if ch == '\n' { '\n' } else { ' ' });
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < c.len() {
        let ident_before = i > 0 && (c[i - 1].is_alphanumeric() || c[i - 1] == '_');
        // A raw string (r"…", r#"…"#, br"…"): its prefix length and hashes.
        let raw_start = if at(i) == 'b' { i + 2 } else { i + 1 };
        let hashes = (raw_start..).take_while(|&j| at(j) == '#').count();
        let raw = !ident_before
            && (at(i) == 'r' || (at(i) == 'b' && at(i + 1) == 'r'))
            && at(raw_start + hashes) == '"';
        if at(i) == '/' && at(i + 1) == '/' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if at(i) == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < c.len() {
                if at(i) == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if at(i) == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, c[i]);
                    i += 1;
                }
            }
        } else if raw {
            i = raw_start + hashes + 1;
            while i < c.len() {
                if c[i] == '"' && (1..=hashes).all(|k| at(i + k) == '#') {
                    i += hashes + 1;
                    break;
                }
                blank(&mut out, c[i]);
                i += 1;
            }
        } else if at(i) == '"' {
            i += 1;
            while i < c.len() && c[i] != '"' {
                if c[i] == '\\' {
                    i += 1;
                }
                if i < c.len() {
                    blank(&mut out, c[i]);
                }
                i += 1;
            }
            i += 1;
        } else if at(i) == '\'' && at(i + 1) == '\\' {
            // An escaped char literal: '\n', '\'', '\u{..}'.
            i += 2;
            while i < c.len() && c[i] != '\'' {
                i += 1;
            }
            i += 1;
        } else if at(i) == '\'' && at(i + 2) == '\'' {
            // A plain char literal such as '"'; a lifetime has no closing quote.
            i += 3;
        } else {
            out.push(c[i]);
            i += 1;
        }
    }
    out
}

/// Identifiers and the punctuation that matters for paths.
fn tokens(code: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let c: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < c.len() {
        if c[i].is_alphanumeric() || c[i] == '_' {
            let start = i;
            while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_') {
                i += 1;
            }
            tokens.push(c[start..i].iter().collect());
        } else if c[i] == ':' && c.get(i + 1) == Some(&':') {
            tokens.push("::".to_owned());
            i += 2;
        } else {
            if !c[i].is_whitespace() {
                tokens.push(c[i].to_string());
            }
            i += 1;
        }
    }
    tokens
}

/// The first segments of every `crate::…` path in `code`: `crate::a::X`
/// gives `a`, `crate::{a::X, b}` gives `a` and `b`.
fn crate_refs(code: &str) -> BTreeSet<String> {
    let t = tokens(&strip(code));
    let mut refs = BTreeSet::new();
    let mut i = 0;
    while i + 2 < t.len() {
        // `$crate` in a macro is the same crate.
        let is_crate = t[i] == "crate" && t[i + 1] == "::";
        if !is_crate {
            i += 1;
            continue;
        }
        if t[i + 2] != "{" {
            refs.insert(t[i + 2].clone());
            i += 3;
            continue;
        }
        // A group: the identifier after `{` or `,` at depth one starts a path.
        let mut depth = 0;
        let mut j = i + 2;
        while j < t.len() {
            match t[j].as_str() {
                "{" => depth += 1,
                "}" => {
                    depth -= 1;
                    if depth == 0 {
                        break;
                    }
                }
                _ if depth == 1 && (t[j - 1] == "{" || t[j - 1] == ",") => {
                    refs.insert(t[j].clone());
                }
                _ => {}
            }
            j += 1;
        }
        i = j + 1;
    }
    refs.remove("self");
    refs
}

/// The crate's top-level modules, from `mod` items in lib.rs.
fn top_level_modules() -> Vec<String> {
    let lib = tokens(&strip(&read(&src().join("lib.rs"))));
    let modules: Vec<String> = lib
        .windows(3)
        .filter(|w| w[0] == "mod" && w[2] == ";")
        .map(|w| w[1].clone())
        .collect();
    assert!(!modules.is_empty(), "no `mod` items found in src/lib.rs");
    modules
}

/// The files of top-level module `m`: src/m.rs, or everything under src/m/.
fn module_files(m: &str) -> Vec<PathBuf> {
    let file = src().join(format!("{m}.rs"));
    let dir = src().join(m);
    let mut files = Vec::new();
    if file.is_file() {
        files.push(file);
    }
    if dir.is_dir() {
        files.extend(rust_files(&dir));
    }
    assert!(!files.is_empty(), "module {m} has no source file");
    files
}

type Graph = BTreeMap<String, BTreeSet<String>>;

/// Which top-level modules each top-level module references.
fn module_graph() -> Graph {
    let modules = top_level_modules();
    let known: BTreeSet<&String> = modules.iter().collect();
    modules
        .iter()
        .map(|m| {
            let deps = module_files(m)
                .iter()
                .flat_map(|f| crate_refs(&read(f)))
                .filter(|d| d != m && known.contains(d))
                .collect();
            (m.clone(), deps)
        })
        .collect()
}

fn describe(graph: &Graph) -> String {
    graph
        .iter()
        .map(|(m, deps)| {
            let deps: Vec<&str> = deps.iter().map(String::as_str).collect();
            format!("  {m} -> {}", deps.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnPath,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        marks.insert(node.to_owned(), Mark::OnPath);
        path.push(node.to_owned());
        for next in graph.get(node).into_iter().flatten() {
            match marks.get(next).copied().unwrap_or(Mark::New) {
                Mark::OnPath => {
                    let start = path.iter().position(|p| p == next).expect("on the path");
                    let mut cycle = path[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                Mark::New => {
                    if let Some(cycle) = visit(next, graph, marks, path) {
                        return Some(cycle);
                    }
                }
                Mark::Done => {}
            }
        }
        path.pop();
        marks.insert(node.to_owned(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if marks.get(node).copied().unwrap_or(Mark::New) == Mark::New
            && let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new())
        {
            return Some(cycle);
        }
    }
    None
}

#[test]
fn no_source_file_is_too_long() {
    let src = src();
    let too_long: Vec<String> = rust_files(&src)
        .iter()
        .filter_map(|f| {
            let lines = read(f).lines().count();
            let name = f.strip_prefix(&src).unwrap_or(f).display().to_string();
            (lines > MAX_LINES).then(|| format!("  src/{name}: {lines} lines"))
        })
        .collect();
    assert!(
        too_long.is_empty(),
        "files over {MAX_LINES} lines; split them along their seams:\n{}",
        too_long.join("\n")
    );
}

#[test]
fn top_level_modules_have_no_cycle() {
    let graph = module_graph();
    // Shown with --no-capture; handy when reviewing a change of layering.
    println!("module graph:\n{}", describe(&graph));
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "the top-level modules reference each other in a cycle: {}\nthe graph:\n{}",
            cycle.join(" -> "),
            describe(&graph)
        );
    }
}

#[test]
fn layering_rules_hold() {
    let graph = module_graph();
    let mut broken = Vec::new();
    for (module, forbidden, why) in FORBIDDEN {
        let deps = graph
            .get(*module)
            .unwrap_or_else(|| panic!("a rule names module {module}, which lib.rs lacks"));
        for f in *forbidden {
            assert!(
                graph.contains_key(*f),
                "a rule names module {f}, which lib.rs lacks"
            );
            if deps.contains(*f) {
                broken.push(format!("  {module} references {f}: {why}"));
            }
        }
    }
    for (module, deps) in &graph {
        if deps.contains("api") && !API_USERS.contains(&module.as_str()) {
            broken.push(format!(
                "  {module} references api: only {} may; api is the outermost layer",
                API_USERS.join(" and ")
            ));
        }
    }
    assert!(
        broken.is_empty(),
        "layering rules broken:\n{}\nthe graph:\n{}",
        broken.join("\n"),
        describe(&graph)
    );
}

/// The reader itself: what counts as a reference and what does not.
#[test]
fn references_are_read_from_code_only() {
    let code = r##"
        use crate::store::{Store, StoreError};
        use crate::{clock::Clock, locks};
        // use crate::commented_line;
        /* crate::block /* nested crate::inner */ still crate::comment */
        let s = "crate::in_string \" crate::escaped";
        let r = r#"crate::raw " crate::raw_quote"#;
        let q = '"'; let e = '\''; fn f<'a>(x: &'a str) {}
        let t = crate::tasks::Activator::new();
        pub(crate) fn g() -> crate::error::ApiError { make() }
        let not = boilerhouse_crate::ignored;
    "##;
    let refs: Vec<String> = crate_refs(code).into_iter().collect();
    assert_eq!(refs, ["clock", "error", "locks", "store", "tasks"]);
}

#[test]
fn cycles_are_found() {
    let graph = |edges: &[(&str, &str)]| {
        let mut g = Graph::new();
        for (a, b) in edges {
            g.entry((*a).to_owned())
                .or_default()
                .insert((*b).to_owned());
            g.entry((*b).to_owned()).or_default();
        }
        g
    };
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("a", "c")])),
        None
    );
    assert_eq!(
        find_cycle(&graph(&[("a", "b"), ("b", "c"), ("c", "a")])),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
