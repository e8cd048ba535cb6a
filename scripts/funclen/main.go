// Command funclen prints the longest functions of the product's non-test Go code (the
// lab and scripts excluded), longest first: what issue 15's note compares before and
// after the restructuring. Usage: go run ./scripts/funclen [-n 10] DIR
package main

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
)

func main() {
	n := flag.Int("n", 10, "how many")
	flag.Parse()
	root := flag.Arg(0)
	type fn struct {
		name  string
		lines int
	}
	var fns []fn
	fset := token.NewFileSet()
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() && (strings.HasPrefix(rel, "internal/lab") || strings.HasPrefix(rel, "scripts") || rel == ".git") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, 0)
		if err != nil {
			return err
		}
		for _, decl := range f.Decls {
			fd, ok := decl.(*ast.FuncDecl)
			if !ok || fd.Body == nil {
				continue
			}
			name := fd.Name.Name
			if fd.Recv != nil && len(fd.Recv.List) > 0 {
				t := fd.Recv.List[0].Type
				if s, ok := t.(*ast.StarExpr); ok {
					t = s.X
				}
				if id, ok := t.(*ast.Ident); ok {
					name = id.Name + "." + name
				} else if ix, ok := t.(*ast.IndexExpr); ok {
					if id, ok := ix.X.(*ast.Ident); ok {
						name = id.Name + "." + name
					}
				}
			}
			lines := fset.Position(fd.End()).Line - fset.Position(fd.Pos()).Line + 1
			fns = append(fns, fn{filepath.Dir(rel) + " " + name, lines})
		}
		return nil
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	sort.Slice(fns, func(i, j int) bool { return fns[i].lines > fns[j].lines })
	total := 0
	for _, f := range fns {
		total += f.lines
	}
	fmt.Printf("%d functions, %d lines in functions\n", len(fns), total)
	for i := 0; i < *n && i < len(fns); i++ {
		fmt.Printf("%4d  %s\n", fns[i].lines, fns[i].name)
	}
}
