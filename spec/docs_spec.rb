# frozen_string_literal: true

require "spec_helper"
require "English"

# The README, docs/ and the comments describe the repository as it is, and
# cite only what a reader can find: RFCs or the repository itself.
RSpec.describe "README, docs and comments" do
  let(:readme) { File.read(File.join(ROOT, "README.md")) }
  let(:pages) do
    Dir[File.join(ROOT, "{README.md,docs/*.md}")].to_h { |path| [path.delete_prefix("#{ROOT}/"), File.read(path)] }
  end
  let(:tracked) do
    out = IO.popen(%w[git ls-files -z], chdir: ROOT, &:read)
    raise "git ls-files failed" unless $CHILD_STATUS.success?

    out.split("\0").reject { |f| f.start_with?("fuzz/seeds/") }
  end
  let(:texts) do
    tracked.filter_map do |file|
      path = File.join(ROOT, file)
      next unless File.file?(path)

      text = File.binread(path)
      [file, text.force_encoding(Encoding::UTF_8)] if text.valid_encoding? && !text.include?("\0")
    end.to_h
  end

  it "cite section numbers only next to the RFC they come from, and no notes outside the repository" do
    offenders = texts.except("spec/docs_spec.rb").flat_map do |file, text|
      found = []
      found << "#{file}: § without any RFC named in the file" if text.include?("§") && !text.include?("RFC")
      text.each_line.with_index(1) do |line, n|
        found << "#{file}:#{n}: #{line.strip}" if line.match?(/project notes|§\s*\d+ items?\b|Thruster\s+\(?§/i)
      end
      found
    end
    expect(offenders).to be_empty
  end

  it "name only Ruby methods that exist in `(see ...)` comments" do
    defined = texts.select { |f, _| f.end_with?(".rb") || f.start_with?("exe/") }.values.join
                   .scan(/def (?:self\.)?([a-z_]+[?!]?)/).flatten
    missing = texts.select { |f, _| f.start_with?("lib/", "exe/") }.flat_map do |file, text|
      # Comments wrap: join their lines first.
      text.gsub(/\n\s*#\s*/, " ").scan(/\(see\s+([a-z_]+[?!]?)(?:\s+and\s+([a-z_]+[?!]?))?\)/).flatten.compact
          .reject { |name| defined.include?(name) }.map { |name| "#{file}: #{name}" }
    end
    expect(missing).to be_empty
  end

  it "list no Status column in the settings tables and nothing as still being built" do
    # The full table in docs/configuration.md (config.rs renders it from
    # SETTINGS) and the README's short one.
    tables = [pages.fetch("docs/configuration.md"), readme[/^## Configuration\n.*?(?=^## )/m]]
    tables.each do |table|
      expect(table.lines.grep(/^\| Variable/).size).to eq(1)
      expect(table.lines.grep(/^\| Variable/).first).not_to include("Status")
      expect(table.lines.grep(/^\| `/).grep(/\| active \|$/)).to be_empty
    end
    expect(pages.values.grep(/being built/)).to be_empty
  end

  it "link only to files and headings that exist, and every docs/ page from the README" do
    slug = ->(heading) { heading.strip.downcase.gsub(/[^\p{Word}\- ]/, "").tr(" ", "-") }
    anchors = lambda do |text|
      text.gsub(/^```.*?^```/m, "").scan(/^#+ (.+)$/).flatten.map(&slug)
    end
    broken = pages.flat_map do |page, text|
      text.scan(/\[[^\]]*\]\(([^)\s]+)\)/).flatten.grep_v(/\A[a-z]+:/).filter_map do |link|
        file, anchor = link.split("#", 2)
        target = file.empty? ? page : File.expand_path(file, File.dirname("/#{page}")).delete_prefix("/")
        path = File.join(ROOT, target)
        if !File.exist?(path)
          "#{page}: #{link} (no #{target})"
        elsif anchor && !anchors.call(File.read(path)).include?(anchor)
          "#{page}: #{link} (no such heading in #{target})"
        end
      end
    end
    expect(broken).to be_empty
    linked = readme.scan(%r{\]\((docs/[^)#\s]+)}).flatten.uniq
    expect(pages.keys.grep(%r{\Adocs/}) - linked).to be_empty
  end

  it "lay out paths that exist, and every top-level directory and lib/ file" do
    layout = readme[/^## Layout\n+```\n(.*?)```/m, 1]
    expect(layout).not_to be_nil
    named = layout.lines.flat_map do |line|
      first = line[/\A([^\s,]+(?:, [^\s,]+)*)/, 1].to_s
      dir = first[%r{\A(.*/)}, 1].to_s
      first.split(", ").map.with_index { |part, i| i.zero? || part.include?("/") ? part : dir + part }
    end.reject(&:empty?)
    expect(named.reject { |path| File.exist?(File.join(ROOT, path)) }).to be_empty
    top = tracked.filter_map { |f| f[%r{\A([^/]+)/}, 1] }.uniq.map { |d| "#{d}/" }
    lib = tracked.grep(%r{\Alib/.*\.rb\z})
    expect(top.reject { |dir| named.any? { |n| n.start_with?(dir) } }).to be_empty
    expect(lib.reject { |file| named.any? { |n| file == n || (n.end_with?("/") && file.start_with?(n)) } })
      .to be_empty
  end
end
