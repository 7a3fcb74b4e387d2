package main

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// adminToken is the static bearer token of the cluster's admin user (system:masters).
const adminToken = "ferry-admin-token"

type cluster struct {
	name, dir, bin string
	// bindIP is where kube-apiserver listens and what it advertises (127.0.0.1 unless
	// --bind-ip); nodes is --nodes (real kubelets will join).
	bindIP   string
	nodes    bool
	pki      *clusterPKI // our own CA and certificates; nil = the apiserver's self-signed one
	etcdPort int
	apiPort  int
	procs    []*proc
}

type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

func freePort() (int, error) { return freePortOn("127.0.0.1") }

func freePortOn(ip string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func (c *cluster) server() string {
	return "https://" + net.JoinHostPort(c.bindIP, fmt.Sprint(c.apiPort))
}
func (c *cluster) kubeconfig() string { return filepath.Join(c.dir, "kubeconfig") }

func (c *cluster) start(timeout time.Duration) error {
	_ = os.RemoveAll(c.dir)
	if err := os.MkdirAll(filepath.Join(c.dir, "pki"), 0o755); err != nil {
		return err
	}
	var err error
	if c.etcdPort, err = freePort(); err != nil {
		return err
	}
	peerPort, err := freePort()
	if err != nil {
		return err
	}
	if c.apiPort, err = freePortOn(c.bindIP); err != nil {
		return fmt.Errorf("no free port on --bind-ip %s: %w", c.bindIP, err)
	}
	if err := c.writeCredentials(); err != nil {
		return err
	}
	if c.bindIP != "127.0.0.1" || c.nodes {
		ips := []net.IP{net.ParseIP(c.bindIP), net.ParseIP("127.0.0.1"), net.ParseIP("10.96.0.1")}
		dns := []string{"localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
			"kubernetes.default.svc.cluster.local"}
		if c.pki, err = writePKI(filepath.Join(c.dir, "pki"), ips, dns); err != nil {
			return fmt.Errorf("writing certificates: %w", err)
		}
	}
	etcdURL := fmt.Sprintf("http://127.0.0.1:%d", c.etcdPort)
	peerURL := fmt.Sprintf("http://127.0.0.1:%d", peerPort)
	if err := c.spawn("etcd", "--name", "default", "--data-dir", filepath.Join(c.dir, "etcd"),
		"--unsafe-no-fsync", "--listen-client-urls", etcdURL, "--advertise-client-urls", etcdURL,
		"--listen-peer-urls", peerURL, "--initial-advertise-peer-urls", peerURL,
		"--initial-cluster", "default="+peerURL, "--log-level", "warn"); err != nil {
		return err
	}
	if err := c.waitHTTP(etcdURL+"/health", nil, timeout); err != nil {
		return fmt.Errorf("etcd: %w", err)
	}
	sa := filepath.Join(c.dir, "sa.key")
	var extra []string
	if c.pki != nil {
		extra = append(extra, "--tls-cert-file="+c.pki.ServingCert, "--tls-private-key-file="+c.pki.ServingKey,
			"--admission-control-config-file="+c.pki.AdmissionConfig)
	}
	if c.nodes {
		// The apiserver reaches kubelets (logs, exec, node proxy) with a client
		// certificate they trust, at their --node-ip (node names do not resolve).
		extra = append(extra, "--kubelet-client-certificate="+c.pki.KubeletClientCert,
			"--kubelet-client-key="+c.pki.KubeletClientKey,
			"--kubelet-preferred-address-types=InternalIP,Hostname")
	}
	if err := c.spawn("kube-apiserver", append([]string{"--etcd-servers=" + etcdURL, "--bind-address=" + c.bindIP,
		"--advertise-address=" + c.bindIP, fmt.Sprintf("--secure-port=%d", c.apiPort),
		"--cert-dir=" + filepath.Join(c.dir, "pki"), "--service-cluster-ip-range=10.96.0.0/16",
		"--allow-privileged=true", "--endpoint-reconciler-type=none",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + sa, "--service-account-signing-key-file=" + sa,
		"--token-auth-file=" + filepath.Join(c.dir, "tokens.csv"), "--authorization-mode=RBAC",
		"--enable-priority-and-fairness=false", "-v=0"}, extra...)...); err != nil {
		return err
	}
	ca := c.caFile()
	if err := c.waitFile(ca, timeout); err != nil {
		return fmt.Errorf("kube-apiserver certificate: %w", err)
	}
	if err := c.writeKubeconfig(ca); err != nil {
		return err
	}
	if err := c.waitHTTP(c.server()+"/readyz", c.tlsConfig(ca), timeout); err != nil {
		return fmt.Errorf("kube-apiserver: %w", err)
	}
	kc := c.kubeconfig()
	// Without --nodes, nodelifecycle is off: fake nodes have no kubelet heartbeat, and
	// its taints would evict test pods. Everything else (GC, namespaces, service
	// accounts) runs. With real kubelets it must run: it removes the not-ready taint a
	// kubelet registers its Node with (else pods stay Pending).
	kcm := []string{"--kubeconfig=" + kc, "--authentication-kubeconfig=" + kc,
		"--authorization-kubeconfig=" + kc, "--bind-address=127.0.0.1", "--secure-port=0",
		"--leader-elect=false", "--service-account-private-key-file=" + sa, "--root-ca-file=" + ca}
	if c.nodes {
		// Per-controller credentials cost a few requests per controller at start: at the
		// default 20 QPS the node lifecycle controller would start ~5 s after the rest.
		kcm = append(kcm, "--controllers=*,-cloud-node-lifecycle", "--use-service-account-credentials=true",
			"--kube-api-qps=500", "--kube-api-burst=1000")
	} else {
		kcm = append(kcm, "--controllers=*,-nodelifecycle,-cloud-node-lifecycle", "--use-service-account-credentials=false")
	}
	if err := c.spawn("kube-controller-manager", kcm...); err != nil {
		return err
	}
	if err := c.spawn("kube-scheduler", "--kubeconfig="+kc, "--authentication-kubeconfig="+kc,
		"--authorization-kubeconfig="+kc, "--bind-address=127.0.0.1", "--secure-port=0",
		"--leader-elect=false"); err != nil {
		return err
	}
	log.Printf("cluster %s: apiserver %s, etcd %s", c.name, c.server(), etcdURL)
	return nil
}

func (c *cluster) writeCredentials() error {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pemKey := pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)})
	if err := os.WriteFile(filepath.Join(c.dir, "sa.key"), pemKey, 0o600); err != nil {
		return err
	}
	tokens := adminToken + `,admin,admin,"system:masters"` + "\n"
	return os.WriteFile(filepath.Join(c.dir, "tokens.csv"), []byte(tokens), 0o600)
}

func (c *cluster) writeKubeconfig(caPath string) error {
	caPEM, err := os.ReadFile(caPath)
	if err != nil {
		return err
	}
	kc := fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: %[1]s
  cluster:
    server: %[2]s
    certificate-authority-data: %[3]s
users:
- name: %[1]s-admin
  user:
    token: %[4]s
contexts:
- name: %[1]s
  context:
    cluster: %[1]s
    user: %[1]s-admin
    namespace: default
current-context: %[1]s
`, c.name, c.server(), b64(caPEM), adminToken)
	return os.WriteFile(c.kubeconfig(), []byte(kc), 0o600)
}

// caFile is the CA clients trust: ours, or apiserver.crt from --cert-dir, a self-signed
// bundle (cert + its CA).
func (c *cluster) caFile() string {
	if c.pki != nil {
		return c.pki.CA
	}
	return filepath.Join(c.dir, "pki", "apiserver.crt")
}

func (c *cluster) tlsConfig(caPath string) *tls.Config {
	pool := x509.NewCertPool()
	if pem, err := os.ReadFile(caPath); err == nil {
		pool.AppendCertsFromPEM(pem)
	}
	return &tls.Config{RootCAs: pool}
}

func (c *cluster) spawn(name string, args ...string) error {
	logf, err := os.Create(filepath.Join(c.dir, name+".log"))
	if err != nil {
		return err
	}
	cmd := exec.Command(filepath.Join(c.bin, name), args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() { _ = cmd.Wait(); logf.Close(); close(p.done) }()
	c.procs = append(c.procs, p)
	return nil
}

func (c *cluster) watch(died chan<- string) {
	for _, p := range c.procs {
		go func(p *proc) {
			<-p.done
			died <- fmt.Sprintf("%s/%s (log: %s)", c.name, p.name, filepath.Join(c.dir, p.name+".log"))
		}(p)
	}
}

// stop ends the components in reverse start order: SIGTERM, then SIGKILL after 5 s.
func (c *cluster) stop() {
	for i := len(c.procs) - 1; i >= 0; i-- {
		p := c.procs[i]
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			_ = p.cmd.Process.Kill()
			<-p.done
		}
	}
	c.procs = nil
}

// errExited says a component exited while we waited for it to become ready: most
// often a port another process took between freePort and the component's bind, so
// the caller starts the cluster again on new ports instead of waiting out the timeout.
type errExited struct{ what, logTail string }

func (e *errExited) Error() string {
	return fmt.Sprintf("%s exited before it was ready; its log ends:\n%s", e.what, e.logTail)
}

// exited reports the first of the cluster's components that has exited, if any.
func (c *cluster) exited() error {
	for _, p := range c.procs {
		select {
		case <-p.done:
			return &errExited{what: p.name, logTail: tail(filepath.Join(c.dir, p.name+".log"), 20)}
		default:
		}
	}
	return nil
}

func tail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	all := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(all) > lines {
		all = all[len(all)-lines:]
	}
	return strings.Join(all, "\n")
}

func (c *cluster) waitHTTP(url string, tlsConfig *tls.Config, timeout time.Duration) error {
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{TLSClientConfig: tlsConfig}}
	deadline := time.Now().Add(timeout)
	var last string
	for time.Now().Before(deadline) {
		if err := c.exited(); err != nil {
			return err
		}
		resp, err := client.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == 200 {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		time.Sleep(200 * time.Millisecond)
	}
	return fmt.Errorf("%s not ready after %v: %s", url, timeout, strings.TrimSpace(last))
}

func (c *cluster) waitFile(path string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if err := c.exited(); err != nil {
			return err
		}
		if st, err := os.Stat(path); err == nil && st.Size() > 0 {
			return nil
		}
		time.Sleep(100 * time.Millisecond)
	}
	return fmt.Errorf("%s not written after %v", path, timeout)
}

// startRetrying starts the cluster, again on fresh ports when a component exited while
// starting (see errExited); any other error, or a third exit, is returned.
func (c *cluster) startRetrying(timeout time.Duration) error {
	for attempt := 1; ; attempt++ {
		err := c.start(timeout)
		var exited *errExited
		if err == nil || !errors.As(err, &exited) || attempt == 3 {
			return err
		}
		log.Printf("cluster %s: %v\nstarting it again (attempt %d of 3)", c.name, err, attempt+1)
		c.stop()
	}
}
