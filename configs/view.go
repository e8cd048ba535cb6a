package configs

import (
	"reflect"
	"time"
)

// View returns the configuration as plain maps and lists keyed like the YAML file, for
// printing. Durations and modes render as the strings the file takes; secret references
// show where a secret is read from, never its value (the Config never holds one).
func (c *Config) View() map[string]any {
	return viewStruct(reflect.ValueOf(*c))
}

func viewStruct(v reflect.Value) map[string]any {
	out := map[string]any{}
	for i := 0; i < v.NumField(); i++ {
		out[v.Type().Field(i).Tag.Get("mapstructure")] = viewValue(v.Field(i))
	}
	return out
}

func viewValue(v reflect.Value) any {
	switch x := v.Interface().(type) {
	case time.Duration:
		return x.String()
	case Mode:
		return x.String()
	case SecretRef:
		ref := map[string]any{}
		if x.File != "" {
			ref["file"] = x.File
		}
		if x.Credential != "" {
			ref["credential"] = x.Credential
		}
		return ref
	}
	switch v.Kind() {
	case reflect.Struct:
		return viewStruct(v)
	case reflect.Slice:
		out := make([]any, v.Len())
		for i := range out {
			out[i] = viewValue(v.Index(i))
		}
		return out
	}
	return v.Interface()
}
