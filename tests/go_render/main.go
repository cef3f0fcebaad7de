// Command go_render executes an Ollama TEMPLATE with Go's own text/template, on the data Ollama gives it, so that
// tests can compare the prompt Ollama would build with the Hugging Face chat template's rendering byte for byte.
//
// Usage: go_render TEMPLATE_FILE MESSAGES_FILE
//
// MESSAGES_FILE holds a JSON list of {"role": ..., "content": ...}: the messages of an Ollama chat request. The
// rendered prompt goes to stdout, unchanged. The template is parsed without Ollama's extra functions, so one that
// needs them fails here rather than in Ollama.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
)

// Message has the fields of Ollama's api.Message that chat templates read.
type Message struct {
	Role      string            `json:"role"`
	Content   string            `json:"content"`
	Thinking  string            `json:"thinking,omitempty"`
	Images    []string          `json:"images,omitempty"`
	ToolCalls []json.RawMessage `json:"tool_calls,omitempty"`
	ToolName  string            `json:"tool_name,omitempty"`
}

// collate prepares messages as Ollama does before executing a template: system messages stay in the list and are
// also joined (blank line between) into System; consecutive messages of one role merge into one, blank line between.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var out []*Message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			system = append(system, m.Content)
		}
		if n := len(out); n > 0 && out[n-1].Role == m.Role {
			out[n-1].Content += "\n\n" + m.Content
			continue
		}
		out = append(out, &m)
	}
	return strings.Join(system, "\n\n"), out
}

func run(templatePath, messagesPath string) error {
	text, err := os.ReadFile(templatePath)
	if err != nil {
		return err
	}
	raw, err := os.ReadFile(messagesPath)
	if err != nil {
		return err
	}
	var msgs []Message
	if err := json.Unmarshal(raw, &msgs); err != nil {
		return fmt.Errorf("%s: %w", messagesPath, err)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Parse(string(text))
	if err != nil {
		return err
	}
	system, messages := collate(msgs)
	// The values Ollama passes to a template that reads .Messages (template.Execute in ollama/template).
	return tmpl.Execute(os.Stdout, map[string]any{
		"System":   system,
		"Messages": messages,
		"Tools":    nil,
		"Prompt":   "",
		"Response": "",
	})
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: go_render TEMPLATE_FILE MESSAGES_FILE")
		os.Exit(2)
	}
	if err := run(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "go_render:", err)
		os.Exit(1)
	}
}
