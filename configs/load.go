package configs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"reflect"
	"sort"
	"strings"
	"time"

	"github.com/go-viper/mapstructure/v2"
	"github.com/spf13/viper"
	"go.yaml.in/yaml/v3"
)

// ErrInvalidConfig is matched (errors.Is) by every error Load returns for a configuration
// the operator must fix; the CLI maps it to exit code 2.
var ErrInvalidConfig = errors.New("invalid configuration")

// FieldError is one problem at one key path.
type FieldError struct {
	Path    string // e.g. nodes[1].host_path; empty for the file as a whole
	Problem string
	Hint    string // what to do about it; may be empty
}

func (e *FieldError) Error() string {
	var b strings.Builder
	if e.Path != "" {
		b.WriteString(e.Path)
		b.WriteString(": ")
	}
	b.WriteString(e.Problem)
	if e.Hint != "" {
		b.WriteString(" (")
		b.WriteString(e.Hint)
		b.WriteString(")")
	}
	return b.String()
}

// ValidationError carries every problem found in one load, in a stable order.
type ValidationError struct {
	Source   string // the file, or "" for defaults and environment only
	Problems []*FieldError
}

func (e *ValidationError) Error() string {
	var b strings.Builder
	src := e.Source
	if src == "" {
		src = "configuration"
	}
	fmt.Fprintf(&b, "%s: %d problem(s):", src, len(e.Problems))
	for _, p := range e.Problems {
		b.WriteString("\n  - ")
		b.WriteString(p.Error())
	}
	return b.String()
}

// Is makes every ValidationError match ErrInvalidConfig.
func (e *ValidationError) Is(target error) bool { return target == ErrInvalidConfig }

// Unwrap exposes each problem to errors.As.
func (e *ValidationError) Unwrap() []error {
	out := make([]error, len(e.Problems))
	for i, p := range e.Problems {
		out[i] = p
	}
	return out
}

// Load reads the configuration: defaults, then the YAML file at path (required unless
// path is empty), then PVA_ environment overrides (PVA_SSH_PORT overrides ssh.port).
// It rejects unknown keys and validates the result; every problem is reported at once.
func Load(path string) (*Config, error) {
	v := viper.New()
	setDefaults(v, reflect.ValueOf(Defaults()), "")
	v.SetEnvPrefix(EnvPrefix)
	v.SetEnvKeyReplacer(strings.NewReplacer(".", "_"))
	v.AutomaticEnv()

	var raw map[string]any
	if path != "" {
		v.SetConfigFile(path)
		v.SetConfigType("yaml")
		if err := v.ReadInConfig(); err != nil {
			return nil, fileError(path, err)
		}
		// Unknown keys are found in the file as written: viper drops a key whose value
		// is empty ("proxmoxx:" or "metricz: {}"), which would hide the typo.
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fileError(path, err)
		}
		if err := yaml.Unmarshal(b, &raw); err != nil {
			return nil, fileError(path, err)
		}
	}

	problems := unknownKeys(lowerKeys(raw), reflect.TypeOf(Config{}), "")
	cfg := Defaults()
	cfg.Nodes = nil
	err := v.Unmarshal(&cfg, viper.DecodeHook(mapstructure.ComposeDecodeHookFunc(
		secretRefHook,
		modeHook,
		mapstructure.StringToTimeDurationHookFunc(),
		mapstructure.StringToSliceHookFunc(","),
	)))
	if err != nil {
		problems = append(problems, decodeProblems(err)...)
	}
	for i := range cfg.Snapshots.Targets {
		// A target without its own retention keeps what the local directory keeps.
		if cfg.Snapshots.Targets[i].Retention == (Retention{}) {
			cfg.Snapshots.Targets[i].Retention = cfg.Snapshots.Retention
		}
	}
	problems = append(problems, withoutOverlap(cfg.validate(), problems)...)
	if len(problems) > 0 {
		return nil, &ValidationError{Source: path, Problems: problems}
	}
	for _, r := range cfg.SecretRefs() {
		if r.Ref.Credential != "" {
			r.Ref.sealed = cfg.SealedCredential(r.Ref.Credential)
		}
	}
	return &cfg, nil
}

func fileError(path string, err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) && errors.Is(pe.Err, fs.ErrNotExist) {
		return &ValidationError{Source: path, Problems: []*FieldError{{
			Problem: "file not found",
			Hint:    "copy configs/config.example.yaml there and edit it, or pass --config PATH",
		}}}
	}
	if errors.Is(err, fs.ErrPermission) {
		return &ValidationError{Source: path, Problems: []*FieldError{{Problem: "permission denied", Hint: "run as root or fix the file's owner"}}}
	}
	return &ValidationError{Source: path, Problems: []*FieldError{{Problem: "not valid YAML: " + err.Error(), Hint: "check indentation and quoting"}}}
}

// withoutOverlap drops validation problems at a key already reported by decoding (or a
// parent or child of it): those are consequences, not separate mistakes.
func withoutOverlap(validation, reported []*FieldError) []*FieldError {
	var out []*FieldError
next:
	for _, v := range validation {
		for _, r := range reported {
			if related(v.Path, r.Path) {
				continue next
			}
		}
		out = append(out, v)
	}
	return out
}

func related(a, b string) bool {
	if a == "" || b == "" {
		return false
	}
	under := func(x, parent string) bool {
		return x == parent || strings.HasPrefix(x, parent+".") || strings.HasPrefix(x, parent+"[")
	}
	return under(a, b) || under(b, a)
}

// setDefaults registers every leaf key with viper so that environment overrides apply
// to keys the file does not mention. Slices of structs (nodes) have no default.
func setDefaults(v *viper.Viper, rv reflect.Value, prefix string) {
	rt := rv.Type()
	for i := 0; i < rt.NumField(); i++ {
		f := rt.Field(i)
		if !f.IsExported() {
			continue
		}
		key := f.Tag.Get("mapstructure")
		if prefix != "" {
			key = prefix + "." + key
		}
		fv := rv.Field(i)
		switch {
		case f.Type.Kind() == reflect.Struct:
			setDefaults(v, fv, key)
		case f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct:
			// no default for lists of objects
		case f.Type == reflect.TypeOf(Mode(0)):
			v.SetDefault(key, fv.Interface().(Mode).String())
		case f.Type == reflect.TypeOf(time.Duration(0)):
			v.SetDefault(key, fv.Interface().(time.Duration).String())
		default:
			v.SetDefault(key, fv.Interface())
		}
	}
}

// unknownKeys walks the merged settings against the schema and reports every key the
// schema does not have, with a suggestion when a known key is close.
func unknownKeys(settings map[string]any, t reflect.Type, prefix string) []*FieldError {
	known := map[string]reflect.StructField{}
	for i := 0; i < t.NumField(); i++ {
		if f := t.Field(i); f.IsExported() {
			known[f.Tag.Get("mapstructure")] = f
		}
	}
	keys := make([]string, 0, len(settings))
	for k := range settings {
		keys = append(keys, k)
	}
	sort.Strings(keys)

	var out []*FieldError
	for _, k := range keys {
		path := k
		if prefix != "" {
			path = prefix + "." + k
		}
		f, ok := known[k]
		if !ok {
			fe := &FieldError{Path: path, Problem: "unknown key"}
			if s := closest(k, known); s != "" {
				fe.Hint = fmt.Sprintf("did you mean %q?", s)
			} else {
				fe.Hint = "see configs/config.example.yaml for the keys of this section"
			}
			out = append(out, fe)
			continue
		}
		val := settings[k]
		switch {
		case f.Type.Kind() == reflect.Struct && f.Type != reflect.TypeOf(time.Duration(0)):
			if m, ok := val.(map[string]any); ok {
				out = append(out, unknownKeys(m, f.Type, path)...)
			}
		case f.Type.Kind() == reflect.Slice && f.Type.Elem().Kind() == reflect.Struct:
			if items, ok := val.([]any); ok {
				for i, it := range items {
					if m, ok := it.(map[string]any); ok {
						out = append(out, unknownKeys(m, f.Type.Elem(), fmt.Sprintf("%s[%d]", path, i))...)
					}
				}
			}
		}
	}
	return out
}

// lowerKeys lower-cases map keys throughout, as viper does.
func lowerKeys(m map[string]any) map[string]any {
	out := make(map[string]any, len(m))
	for k, v := range m {
		out[strings.ToLower(k)] = lowerValue(v)
	}
	return out
}

func lowerValue(v any) any {
	switch x := v.(type) {
	case map[string]any:
		return lowerKeys(x)
	case []any:
		out := make([]any, len(x))
		for i, e := range x {
			out[i] = lowerValue(e)
		}
		return out
	}
	return v
}

// closest returns the known key within edit distance 2 of k, if any.
func closest(k string, known map[string]reflect.StructField) string {
	best, bestD := "", 3
	for name := range known {
		if d := editDistance(k, name); d < bestD || (d == bestD && name < best) {
			best, bestD = name, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}

// secretRefHook refuses an inline scalar where a SecretRef belongs, without echoing it.
func secretRefHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(SecretRef{}) || from.Kind() == reflect.Map {
		return data, nil
	}
	return nil, errors.New("inline secret values are not accepted; write {file: /path/0600-file} or {credential: NAME}")
}

// modeHook parses a quoted octal mode and refuses a bare number, whose base YAML guesses.
func modeHook(from, to reflect.Type, data any) (any, error) {
	if to != reflect.TypeOf(Mode(0)) {
		return data, nil
	}
	if from.Kind() != reflect.String {
		return nil, errors.New("write the mode as a quoted octal string, e.g. \"0700\"")
	}
	return ParseMode(data.(string))
}

// decodeProblems turns mapstructure's multi-line error into one FieldError per line.
func decodeProblems(err error) []*FieldError {
	var out []*FieldError
	for _, line := range strings.Split(err.Error(), "\n") {
		line = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), "*"))
		if line == "" || strings.HasPrefix(line, "decoding failed") || strings.HasSuffix(line, "error(s) decoding:") {
			continue
		}
		fe := &FieldError{Problem: line}
		if strings.HasPrefix(line, "'") {
			if end := strings.Index(line[1:], "'"); end >= 0 {
				fe.Path = line[1 : end+1]
				fe.Problem = strings.TrimSpace(line[end+2:])
			}
		}
		out = append(out, fe)
	}
	if len(out) == 0 {
		out = append(out, &FieldError{Problem: err.Error()})
	}
	return out
}
