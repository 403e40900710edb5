//! Where the lifecycle tracepoints keep their fields, read from their tracefs format files:
//! the layouts differ between kernels (`sched_process_exit` gained `group_dead` in 6.x).

use std::path::Path;

use tracer_common::tracepoint_fields as slot;

const TRACEFS: &[&str] = &["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// The `TRACEPOINT_FIELDS` global: every slot's offset, or all zero when the format files
/// cannot be read (forks are then not followed in the kernel).
pub fn fields() -> [u32; slot::LEN] {
    let mut out = [0u32; slot::LEN];
    let newtask = format("task", "task_newtask");
    let exit = format("sched", "sched_process_exit");
    let (Some(newtask), Some(exit)) = (newtask, exit) else {
        return out;
    };
    let (Some(pid), Some(flags)) = (offset(&newtask, "pid"), offset(&newtask, "clone_flags"))
    else {
        return out;
    };
    out[slot::NEWTASK_PID] = pid;
    out[slot::NEWTASK_FLAGS] = flags;
    out[slot::EXIT_GROUP_DEAD] = offset(&exit, "group_dead").unwrap_or(0);
    out[slot::EXEC_FILENAME] = format("sched", "sched_process_exec")
        .and_then(|exec| offset(&exec, "filename"))
        .unwrap_or(0);
    out[slot::SIGNAL_HANDLER] = format("signal", "signal_deliver")
        .and_then(|deliver| offset(&deliver, "sa_handler"))
        .unwrap_or(0);
    out[slot::FOUND] = 1;
    out
}

fn format(category: &str, event: &str) -> Option<String> {
    TRACEFS.iter().find_map(|root| {
        std::fs::read_to_string(Path::new(root).join(format!("events/{category}/{event}/format")))
            .ok()
    })
}

/// The offset of field `name` in a format file (`field:pid_t pid; offset:8; size:4;…`, the
/// parts separated by tabs).
fn offset(format: &str, name: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let field = line.trim().strip_prefix("field:")?;
        let (decl, rest) = field.split_once(';')?;
        let ident = decl.split_whitespace().last()?.split('[').next()?;
        if ident != name {
            return None;
        }
        let offset = rest.split_once("offset:")?.1.split(';').next()?;
        offset.trim().parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_field_offsets() {
        let text = "name: task_newtask\nformat:\n\
                    \tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\
                    \tfield:pid_t pid;\toffset:8;\tsize:4;\tsigned:1;\n\
                    \tfield:char comm[16];\toffset:12;\tsize:16;\tsigned:0;\n\
                    \tfield:u64 clone_flags;\toffset:32;\tsize:8;\tsigned:0;\n";
        assert_eq!(offset(text, "pid"), Some(8));
        assert_eq!(offset(text, "comm"), Some(12));
        assert_eq!(offset(text, "clone_flags"), Some(32));
        assert_eq!(offset(text, "nope"), None);
    }

    #[test]
    fn this_kernel_s_lifecycle_fields_are_found() {
        let f = fields();
        assert_eq!(f[slot::FOUND], 1, "is tracefs mounted?");
        assert!(f[slot::NEWTASK_PID] > 0 && f[slot::NEWTASK_FLAGS] > 0);
    }
}
