"""Helpers the benchmarks share: ports, waiting, the Envoy binary, and a
proxy spawned as dockerd spawns it (argv[0] docker-proxy, the status pipe on
fd 3, and with Docker 28+ the pre-bound socket on fd 4, whose daemon copy is
closed once "0\\n" has been read, as moby's StartProxy does)."""
import fcntl, os, resource, socket, subprocess, time


def cpu_seconds(pid):
    """User plus system time of process pid, in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def more_files():
    """Raises the open-file limit to the hard limit (for many proxies)."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(pred, limit=30.0, step=0.02):
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(step)
    return False


def envoy_bin():
    import envoy
    return os.path.join(os.path.dirname(envoy.__file__), "_bin", "envoy")


def enter_netns(name):
    """Moves the calling thread (or a child before exec) into network
    namespace /run/netns/NAME. Python 3.11 has no os.setns."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns {name}")
    finally:
        os.close(fd)


def spawn_proxy(path, port, backend_port, sock_path, listen_sock=None, backend_ip="127.0.0.2",
                host_ip="127.0.0.1", netns=None):
    """Starts one proxy (in network namespace `netns`, if given); returns
    (process, seconds until "0\\n")."""
    r, w = os.pipe()
    high_w = fcntl.fcntl(w, fcntl.F_DUPFD_CLOEXEC, 100)
    os.close(w)
    high_l = fcntl.fcntl(listen_sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 100) if listen_sock else None
    args = ["docker-proxy", "-proto", "tcp", "-host-ip", host_ip, "-host-port", str(port),
            "-container-ip", backend_ip, "-container-port", str(backend_port)]
    if listen_sock:
        args.append("-use-listen-fd")

    def place():
        if netns:
            enter_netns(netns)
        os.dup2(high_w, 3)
        if high_l is not None:
            os.dup2(high_l, 4)

    start = time.monotonic()
    p = subprocess.Popen(args, executable=path, preexec_fn=place, pass_fds=(3, 4) if listen_sock else (3,),
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ, ENVOY_DOCKER_SOCKET=sock_path))
    os.close(high_w)
    if high_l is not None:
        os.close(high_l)
    status = os.read(r, 2)
    took = time.monotonic() - start
    os.close(r)
    if listen_sock:
        listen_sock.close()  # the daemon's copy, closed once StartProxy returned
    if status != b"0\n":
        raise SystemExit(f"proxy on {port} reported {status!r}")
    return p, took
