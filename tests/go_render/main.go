// Command go_render executes an Ollama TEMPLATE with Go's own text/template, on the data Ollama gives it, so that
// tests can compare the prompt Ollama would build with the chat template's rendering byte for byte.
//
// Usage: go_render TEMPLATE_FILE REQUEST_FILE
//
//	go_render -prefix TEMPLATE_FILE
//
// REQUEST_FILE holds the body of an Ollama chat request, {"messages": [...], "tools": [...]}: messages with "role",
// "content" and, for an assistant's tool calls, "tool_calls": [{"id", "function": {"name", "arguments"}}]; tools as
// OpenAI-style function schemas. The rendered prompt goes to stdout, unchanged. With -prefix, it prints the text
// Ollama's tool parser expects before a tool call in the model's output, read off the template (callPrefix).
//
// The types below mirror the parts of Ollama's api types that templates read (api/types.go) and their JSON:
// tool schemas keep only the keys Ollama models, in its field order, and objects the user wrote (properties,
// arguments) keep their key order. The template gets only Ollama's own function, json (template/template.go), so a
// template that needs more fails here rather than in Ollama.
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"text/template"
	"text/template/parse"
)

// orderedMap is a JSON object that keeps its keys' order, as Ollama's internal/orderedmap does; its values are
// decoded with encoding/json, so objects nested in them come back with sorted keys, as in Ollama.
type orderedMap[V any] struct {
	keys   []string
	values map[string]V
}

func (m *orderedMap[V]) UnmarshalJSON(data []byte) error {
	m.keys, m.values = nil, map[string]V{}
	dec := json.NewDecoder(bytes.NewReader(data))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return fmt.Errorf("expected a JSON object, got %s", data)
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return err
		}
		var v V
		if err := dec.Decode(&v); err != nil {
			return err
		}
		key := tok.(string)
		if _, seen := m.values[key]; !seen {
			m.keys = append(m.keys, key)
		}
		m.values[key] = v
	}
	_, err := dec.Token()
	return err
}

func (m orderedMap[V]) MarshalJSON() ([]byte, error) {
	if m.values == nil {
		return []byte("{}"), nil // Ollama writes absent arguments as {}
	}
	var buf bytes.Buffer
	buf.WriteByte('{')
	for i, key := range m.keys {
		if i > 0 {
			buf.WriteByte(',')
		}
		k, _ := json.Marshal(key)
		v, err := json.Marshal(m.values[key])
		if err != nil {
			return nil, err
		}
		buf.Write(k)
		buf.WriteByte(':')
		buf.Write(v)
	}
	buf.WriteByte('}')
	return buf.Bytes(), nil
}

// Message has the fields of Ollama's api.Message.
type Message struct {
	Role       string     `json:"role"`
	Content    string     `json:"content"`
	Thinking   string     `json:"thinking,omitempty"`
	Images     []string   `json:"images,omitempty"`
	ToolCalls  []ToolCall `json:"tool_calls,omitempty"`
	ToolName   string     `json:"tool_name,omitempty"`
	ToolCallID string     `json:"tool_call_id,omitempty"`
}

type ToolCall struct {
	ID       string           `json:"id,omitempty"`
	Function ToolCallFunction `json:"function"`
}

type ToolCallFunction struct {
	Index     int             `json:"index"`
	Name      string          `json:"name"`
	Arguments orderedMap[any] `json:"arguments"`
}

type Tool struct {
	Type     string       `json:"type"`
	Items    any          `json:"items,omitempty"`
	Function ToolFunction `json:"function"`
}

type ToolFunction struct {
	Name        string                 `json:"name"`
	Description string                 `json:"description,omitempty"`
	Parameters  ToolFunctionParameters `json:"parameters"`
}

type ToolFunctionParameters struct {
	Type       string                    `json:"type"`
	Defs       any                       `json:"$defs,omitempty"`
	Items      any                       `json:"items,omitempty"`
	Required   []string                  `json:"required,omitempty"`
	Properties *orderedMap[ToolProperty] `json:"properties"`
}

type ToolProperty struct {
	AnyOf       []ToolProperty            `json:"anyOf,omitempty"`
	Type        PropertyType              `json:"type,omitempty"`
	Items       any                       `json:"items,omitempty"`
	Description string                    `json:"description,omitempty"`
	Enum        []any                     `json:"enum,omitempty"`
	Properties  *orderedMap[ToolProperty] `json:"properties,omitempty"`
}

// PropertyType is a JSON Schema type: one name, or a list of them.
type PropertyType []string

func (pt *PropertyType) UnmarshalJSON(data []byte) error {
	var s string
	if err := json.Unmarshal(data, &s); err == nil {
		*pt = []string{s}
		return nil
	}
	var a []string
	if err := json.Unmarshal(data, &a); err != nil {
		return err
	}
	*pt = a
	return nil
}

func (pt PropertyType) MarshalJSON() ([]byte, error) {
	if len(pt) == 1 {
		return json.Marshal(pt[0])
	}
	return json.Marshal([]string(pt))
}

// Request is the part of Ollama's api.ChatRequest that reaches the template.
type Request struct {
	Messages []Message `json:"messages"`
	Tools    []Tool    `json:"tools"`
}

// funcs is Ollama's template.FuncMap: json is encoding/json's Marshal (compact, <, > and & escaped).
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// collate prepares messages as Ollama does before executing a template: system messages stay in the list and are
// also joined (blank line between) into System; consecutive messages of one role merge into one, blank line
// between, except tool results, which stay one message each.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := &msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role && m.Role != "tool" {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, m)
	}
	return strings.Join(system, "\n\n"), out
}

func run(templatePath, requestPath string) error {
	text, err := os.ReadFile(templatePath)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(requestPath)
	if err != nil {
		return err
	}
	var req Request
	if err := json.Unmarshal(raw, &req); err != nil {
		return fmt.Errorf("%s: %w", requestPath, err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(string(text))
	if err != nil {
		return err
	}
	system, messages := collate(req.Messages)
	// The values Ollama passes to a template that reads .Messages (template.Execute in ollama/template).
	return tmpl.Execute(os.Stdout, map[string]any{
		"System":   system,
		"Messages": messages,
		"Tools":    req.Tools,
		"Prompt":   "",
		"Response": "",
	})
}

// callPrefix is where Ollama's tool parser (tools/template.go) looks for tool calls in a reply: the first text in
// the first `if` that tests .ToolCalls, provided no action comes before it, trimmed and cut at the first "{".
// Empty, Ollama takes a reply's first JSON object ("{") as the call.
func callPrefix(templatePath string) (string, error) {
	text, err := os.ReadFile(templatePath)
	if err != nil {
		return "", err
	}
	tmpl, err := template.New("").Funcs(funcs).Parse(string(text))
	if err != nil {
		return "", err
	}
	node := firstIfToolCalls(tmpl.Tree.Root)
	if node == nil {
		return "", fmt.Errorf("no {{ if .ToolCalls }} in the template")
	}
	prefix, _ := firstText(node.List)
	prefix, _, _ = strings.Cut(strings.TrimSpace(prefix), "{")
	if prefix == "" {
		prefix = "{"
	}
	return prefix, nil
}

func firstIfToolCalls(n parse.Node) *parse.IfNode {
	var lists []*parse.ListNode
	switch n := n.(type) {
	case *parse.ListNode:
		lists = []*parse.ListNode{n}
	case *parse.IfNode:
		for _, cmd := range n.Pipe.Cmds {
			for _, arg := range cmd.Args {
				if field, ok := arg.(*parse.FieldNode); ok && slices.Contains(field.Ident, "ToolCalls") {
					return n
				}
			}
		}
		lists = []*parse.ListNode{n.List, n.ElseList}
	case *parse.RangeNode:
		lists = []*parse.ListNode{n.List, n.ElseList}
	case *parse.WithNode:
		lists = []*parse.ListNode{n.List, n.ElseList}
	}
	for _, list := range lists {
		if list == nil {
			continue
		}
		for _, child := range list.Nodes {
			if found := firstIfToolCalls(child); found != nil {
				return found
			}
		}
	}
	return nil
}

// firstText returns the first text in list, depth first; done is true once an action or a branch ends the search.
func firstText(list *parse.ListNode) (text string, done bool) {
	if list == nil {
		return "", false
	}
	for _, n := range list.Nodes {
		switch n := n.(type) {
		case *parse.TextNode:
			return string(n.Text), true
		case *parse.ActionNode:
			return "", true
		case *parse.IfNode, *parse.RangeNode, *parse.WithNode:
			var branch *parse.BranchNode
			switch n := n.(type) {
			case *parse.IfNode:
				branch = &n.BranchNode
			case *parse.RangeNode:
				branch = &n.BranchNode
			case *parse.WithNode:
				branch = &n.BranchNode
			}
			if text, found := firstText(branch.List); found && text != "" {
				return text, true
			}
			text, _ := firstText(branch.ElseList)
			return text, true
		}
	}
	return "", false
}

func main() {
	if len(os.Args) == 3 && os.Args[1] == "-prefix" {
		prefix, err := callPrefix(os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, "go_render:", err)
			os.Exit(1)
		}
		fmt.Print(prefix)
		return
	}
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go_render TEMPLATE_FILE REQUEST_FILE | go_render -prefix TEMPLATE_FILE")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "go_render:", err)
		os.Exit(1)
	}
}
