// Command ferry-testenv runs real, independent Kubernetes control planes on loopback for
// ferry's tests and demo: per cluster one etcd, kube-apiserver, kube-controller-manager
// and kube-scheduler, on free ports, with an admin kubeconfig written to
// DIR/<cluster>/kubeconfig.
//
//	ferry-testenv up --dir DIR --bin BINDIR [--bind-ip IP] [--nodes] east west
//
// prints one JSON line {"clusters":[{"name","kubeconfig","server"}]} when every cluster
// answers /readyz, then runs until SIGTERM/SIGINT and stops everything it started.
// --bind-ip puts kube-apiserver on a LAN address (with a cluster CA of our own whose
// serving certificate covers it); --nodes prepares the clusters for real kubelets (node
// lifecycle controller, a kubelet client certificate); both add "ca" and
// "kubeletClientCA" to each cluster's entry.
// Children get SIGKILL if ferry-testenv itself dies (Pdeathsig), so no process outlives it.
//
// No kubelet runs here: the tests either play the kubelet's part or start real kubelets
// (ferry_testkit::kube_node) against a --nodes cluster (see docs/testenv.md).
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"
)

type clusterInfo struct {
	Name       string `json:"name"`
	Kubeconfig string `json:"kubeconfig"`
	Server     string `json:"server"`
	// With --bind-ip or --nodes: the cluster CA (it signed the serving certificate), and
	// the CA kubelets must trust as x509 clientCAFile (same file).
	CA              string `json:"ca,omitempty"`
	KubeletClientCA string `json:"kubeletClientCA,omitempty"`
}

func main() {
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	log.SetPrefix("ferry-testenv: ")
	if len(os.Args) < 2 || os.Args[1] != "up" {
		fmt.Fprintln(os.Stderr, "usage: ferry-testenv up --dir DIR [--bin BINDIR] CLUSTER...")
		os.Exit(2)
	}
	fs := flag.NewFlagSet("up", flag.ExitOnError)
	dir := fs.String("dir", "", "state directory (created; one subdirectory per cluster)")
	bin := fs.String("bin", "", "directory with etcd, kube-apiserver, kube-controller-manager, kube-scheduler (default: next to this binary)")
	timeout := fs.Duration("timeout", 120*time.Second, "how long a cluster may take to become ready")
	removeDir := fs.Bool("remove-dir", false, "delete --dir after stopping (for throwaway test clusters)")
	bindIP := fs.String("bind-ip", "127.0.0.1", "IPv4 address kube-apiserver listens on and advertises (a LAN address node namespaces reach)")
	nodes := fs.Bool("nodes", false, "real kubelets join: run the node lifecycle controller, give the apiserver a kubelet client certificate")
	_ = fs.Parse(os.Args[2:])
	if ip := net.ParseIP(*bindIP); ip == nil || ip.To4() == nil {
		log.Fatalf("--bind-ip %q is not an IPv4 address", *bindIP)
	}
	names := fs.Args()
	if *dir == "" || len(names) == 0 {
		log.Fatal("--dir and at least one cluster name are required")
	}
	if *bin == "" {
		self, err := os.Executable()
		if err != nil {
			log.Fatal(err)
		}
		*bin = filepath.Dir(self)
	}

	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT)

	var clusters []*cluster
	stopAll := func() {
		for i := len(clusters) - 1; i >= 0; i-- {
			clusters[i].stop()
		}
		if *removeDir {
			_ = os.RemoveAll(*dir)
		}
	}
	infos := []clusterInfo{}
	for _, name := range names {
		c := &cluster{name: name, dir: filepath.Join(*dir, name), bin: *bin, bindIP: *bindIP, nodes: *nodes}
		clusters = append(clusters, c)
		if err := c.startRetrying(*timeout); err != nil {
			stopAll()
			log.Fatalf("cluster %s: %v", name, err)
		}
		info := clusterInfo{Name: name, Kubeconfig: c.kubeconfig(), Server: c.server()}
		if c.pki != nil {
			info.CA, info.KubeletClientCA = c.pki.CA, c.pki.CA
		}
		infos = append(infos, info)
	}
	out, _ := json.Marshal(map[string]any{"clusters": infos})
	_ = os.WriteFile(filepath.Join(*dir, "clusters.json"), out, 0o644)
	fmt.Println(string(out))
	log.Printf("ready: %d cluster(s)", len(infos))

	// Exit (stopping everything) on a signal, when any component dies, or when the
	// process that started us is gone (a test binary that exited without stopping us).
	died := make(chan string, len(clusters)*4+1)
	parent := os.Getppid()
	go func() {
		for range time.Tick(500 * time.Millisecond) {
			if os.Getppid() != parent {
				died <- "parent process"
				return
			}
		}
	}()
	for _, c := range clusters {
		c.watch(died)
	}
	select {
	case s := <-sigs:
		log.Printf("%v: stopping", s)
		stopAll()
	case what := <-died:
		log.Printf("%s exited: stopping everything", what)
		stopAll()
		os.Exit(1)
	}
}
