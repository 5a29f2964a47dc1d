// nodemem-nri is an NRI plugin that sets a container's oom_score_adj when the runtime
// creates it, so its first process already runs with the value (no window in which a
// rule-less score applies, unlike an agent that rewrites /proc after the fact).
//
// Rules are a JSON list, first match wins; a rule matches a pod by namespace (empty:
// any) and by labels (all of matchLabels must be equal; empty: any):
//
//	[{"namespace": "shop", "matchLabels": {"app": "cart"}, "oomScoreAdj": 900}]
//
// The file is re-read when its mtime or size changes (checked on every event). A file
// that is missing or malformed is logged and no container is adjusted until it is fixed.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"sync"
	"time"

	"github.com/containerd/nri/pkg/api"
	"github.com/containerd/nri/pkg/stub"
)

type rule struct {
	Namespace   string            `json:"namespace,omitempty"`
	MatchLabels map[string]string `json:"matchLabels,omitempty"`
	OomScoreAdj *int              `json:"oomScoreAdj"`
}

func (r rule) matches(pod *api.PodSandbox) bool {
	if r.Namespace != "" && r.Namespace != pod.GetNamespace() {
		return false
	}
	labels := pod.GetLabels()
	for k, v := range r.MatchLabels {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func parseRules(data []byte) ([]rule, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	var rules []rule
	if err := dec.Decode(&rules); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("trailing data after the rule list")
	}
	for i, r := range rules {
		switch {
		case r.OomScoreAdj == nil:
			return nil, fmt.Errorf("rule %d: oomScoreAdj is required", i)
		case *r.OomScoreAdj < -1000 || *r.OomScoreAdj > 1000:
			return nil, fmt.Errorf("rule %d: oomScoreAdj %d is outside [-1000, 1000]", i, *r.OomScoreAdj)
		}
	}
	return rules, nil
}

// ruleFile caches the rules of one file, reloading them when the file changes.
type ruleFile struct {
	path string

	mu    sync.Mutex
	mtime time.Time
	size  int64
	rules []rule
	err   error
}

func (f *ruleFile) current() ([]rule, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	info, err := os.Stat(f.path)
	if err != nil {
		if f.err == nil || f.err.Error() != err.Error() {
			log.Printf("rules: %v; adjusting nothing until it is fixed", err)
		}
		f.mtime, f.size, f.rules, f.err = time.Time{}, -1, nil, err
		return nil, err
	}
	if info.ModTime().Equal(f.mtime) && info.Size() == f.size {
		return f.rules, f.err
	}
	f.mtime, f.size = info.ModTime(), info.Size()
	data, err := os.ReadFile(f.path)
	if err == nil {
		f.rules, err = parseRules(data)
	}
	if err != nil {
		f.rules, f.err = nil, fmt.Errorf("%s: %w", f.path, err)
		log.Printf("rules: %v; adjusting nothing until it is fixed", f.err)
	} else {
		f.err = nil
		log.Printf("rules: loaded %d from %s", len(f.rules), f.path)
	}
	return f.rules, f.err
}

type plugin struct {
	rules *ruleFile
}

func (p *plugin) CreateContainer(_ context.Context, pod *api.PodSandbox, ctr *api.Container) (*api.ContainerAdjustment, []*api.ContainerUpdate, error) {
	who := fmt.Sprintf("%s/%s container %s", pod.GetNamespace(), pod.GetName(), ctr.GetName())
	rules, err := p.rules.current()
	if err != nil {
		log.Printf("%s: not adjusted: rules unusable: %v", who, err)
		return nil, nil, nil
	}
	for i, r := range rules {
		if r.matches(pod) {
			log.Printf("%s: rule %d matches: oom_score_adj %d", who, i, *r.OomScoreAdj)
			adjust := &api.ContainerAdjustment{}
			adjust.SetLinuxOomScoreAdj(r.OomScoreAdj)
			return adjust, nil, nil
		}
	}
	log.Printf("%s: no rule matches: not adjusted", who)
	return nil, nil, nil
}

func main() {
	socket := flag.String("socket", api.DefaultSocketPath, "the runtime's NRI socket")
	rulesPath := flag.String("rules", "/etc/nodemem/oom-rules.json", "JSON rule file")
	name := flag.String("name", "nodemem-oom", "plugin name to register")
	idx := flag.String("idx", "10", "plugin index (order among plugins)")
	flag.Parse()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)

	p := &plugin{rules: &ruleFile{path: *rulesPath, size: -1}}
	p.rules.current() // logs the initial state of the rules
	s, err := stub.New(p,
		stub.WithSocketPath(*socket),
		stub.WithPluginName(*name),
		stub.WithPluginIdx(*idx),
	)
	if err != nil {
		log.Fatalf("creating the NRI stub: %v", err)
	}
	// Run returns when the runtime closes the connection (e.g. a containerd restart):
	// exit non-zero so that whoever runs the plugin restarts it and it re-registers.
	if err := s.Run(context.Background()); err != nil {
		log.Fatalf("NRI connection: %v", err)
	}
	log.Fatal("NRI connection closed")
}
