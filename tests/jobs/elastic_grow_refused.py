"""Elastic mode job: comm.grow() where MPI cannot spawn (every slot taken) raises BackendUnavailableError clearly."""
import collective as col

comm = col.init()
if comm.is_replacement:
    print("FAIL a process was spawned", flush=True)
else:
    try:
        comm = comm.grow(1)
        print(f"FAIL grew to {comm.size}", flush=True)
    except col.BackendUnavailableError as e:
        print(f"refused on rank {comm.rank}: {e}", flush=True)
