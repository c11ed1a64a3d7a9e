//! Tasks tied to the value that owns them.

use tokio::task::JoinHandle;

/// Aborts its task when dropped: a helper task (a stats reporter, a load
/// stream) ends with the session it serves, however that session ends.
#[derive(Debug)]
pub struct AbortOnDrop(JoinHandle<()>);

impl AbortOnDrop {
    /// Ties `task` to the returned value.
    pub fn new(task: JoinHandle<()>) -> Self {
        AbortOnDrop(task)
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
