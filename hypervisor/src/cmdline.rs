//! The hypervisor command line: space-separated `key=value` words.
//! `guests=a,b,...` names the guests to run from the boot archive (a guest may appear
//! more than once), `log=error|warn|info|debug|trace`, `test=fault` (a test build fault).

use heapless_words::Words;

/// A deliberate misbehaviour for the test scenarios.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Test {
    /// Read an unmapped address after boot: proves the exception path.
    Fault,
}

/// Parsed command line.
pub struct Args {
    pub guests: Words,
    pub log_level: log::LevelFilter,
    pub test: Option<Test>,
    unknown: Words,
}

impl Args {
    pub fn parse(line: &'static str) -> Args {
        let mut a = Args { guests: Words::new(), log_level: log::LevelFilter::Info, test: None, unknown: Words::new() };
        for word in line.split_ascii_whitespace() {
            match word.split_once('=') {
                Some(("guests", list)) => list.split(',').filter(|g| !g.is_empty()).for_each(|g| a.guests.push(g)),
                Some(("log", level)) => match level.parse() {
                    Ok(l) => a.log_level = l,
                    Err(_) => a.unknown.push(word),
                },
                Some(("test", "fault")) => a.test = Some(Test::Fault),
                _ => a.unknown.push(word),
            }
        }
        a
    }

    /// Words that were not understood.
    pub fn warnings(&self) -> impl Iterator<Item = &&'static str> {
        self.unknown.iter()
    }
}

mod heapless_words {
    /// Up to 32 words of the command line, without the heap.
    pub struct Words {
        items: [&'static str; 32],
        len: usize,
    }

    impl Words {
        pub const fn new() -> Self {
            Words { items: [""; 32], len: 0 }
        }

        pub fn push(&mut self, w: &'static str) {
            if self.len < self.items.len() {
                self.items[self.len] = w;
                self.len += 1;
            }
        }

        pub fn iter(&self) -> core::slice::Iter<'_, &'static str> {
            self.items[..self.len].iter()
        }
    }
}
