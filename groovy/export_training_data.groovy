/*
 * export_training_data.groovy -- export the (corrected) annotations of a project for training.
 *
 * Written for QuPath 0.4, 0.5, 0.6 and 0.7. Run it once with Run (any image open, or
 * none): it exports every image of the project. Run > Run for project works too: the whole project
 * is exported once, at the first image QuPath hands to the script; the later images of the same run
 * only print that they were done.
 *
 * What it writes into OUTPUT_DIR, per image that was saved in QuPath:
 *   - <imageName>.geojson: all annotations as a GeoJSON FeatureCollection (ZEUS names and
 *     measurements kept, so `zeus export <project> --out DIR` can tell annotator-corrected objects
 *     from untouched ZEUS ones; it reads these files from <project>/export);
 *   - <imageName>-labels<MASK_EXTENSION>: a label mask at DOWNSAMPLE (QuPath's LabeledImageServer):
 *     background 0, the classes as in labels.json; where annotations of different classes overlap,
 *     the higher label is on top; only annotations with an area are drawn. The mask needs the image
 *     file: an image that cannot be opened on this computer gets a one-line message, its GeoJSON
 *     all the same, and no mask (an older mask of it is removed, so none is left that disagrees);
 *   - labels.json: the label of each class, the same for every image, by the rule `zeus export`
 *     (bridge/label_masks.py) follows too: the classes of the annotations with an area, without QuPath's
 *     '*' classes (Ignore*, Region*); names that differ only in case share one label (all spellings
 *     are listed); the positive class gets 1, the others 2, 3, ... in the order of their lower-case
 *     names (Unicode code points);
 *   - with EXPORT_TILES: image tiles and matching label tiles of the annotated areas (TileExporter)
 *     in <OUTPUT_DIR>/tiles/<imageName>/.
 * Every file is written under a temporary name and renamed, so none is ever half-written. Images
 * that were never saved (so the ZEUS annotations were never imported into them) are skipped:
 * exporting them would look as if every ZEUS annotation had been deleted. One image that fails never
 * stops the others; a summary line comes at the end.
 *
 * The positive class (label 1), when TUMOR_CLASS is '': the most frequent class of ZEUS's
 * annotations as published into the project (data/<entryID>/zeus_annotations.geojson of the
 * exported images, in project order), else of the annotations named "ZEUS <class>", else Tumor;
 * ties go to the class met first.
 *
 * Parameters (edit below):
 *   OUTPUT_DIR      '' = <project folder>/export
 *   ALL_IMAGES      true = every image of the project; false = the open image only
 *   DOWNSAMPLE      downsample of the label mask (16 = 1/16 of the full resolution in x and y)
 *   MASK_EXTENSION  '.png' (use '.ome.tif' for very large masks)
 *   TUMOR_CLASS     the class that gets label 1 (compared ignoring case); '' = ZEUS's class (above)
 *   EXPORT_TILES    false; true = also export tiles
 *   TILE_SIZE, TILE_DOWNSAMPLE, TILE_OVERLAP, TILE_EXTENSION   tile export settings
 */

import java.nio.file.Files
import java.nio.file.Path
import java.nio.file.StandardCopyOption

import org.locationtech.jts.geom.Coordinate

import qupath.lib.images.servers.LabeledImageServer
import qupath.lib.images.writers.TileExporter
import qupath.lib.io.GsonTools
import qupath.lib.io.PathIO
import qupath.lib.roi.GeometryTools
import qupath.lib.roi.PolygonROI

import static qupath.lib.scripting.QP.*

// ------------------------------------------------------------------------------------ parameters
String OUTPUT_DIR = ''
boolean ALL_IMAGES = true
double DOWNSAMPLE = 16.0
String MASK_EXTENSION = '.png'
String TUMOR_CLASS = ''
boolean EXPORT_TILES = false
int TILE_SIZE = 512
double TILE_DOWNSAMPLE = 1.0
int TILE_OVERLAP = 0
String TILE_EXTENSION = '.jpg'

// ------------------------------------------------------------------------------------ helpers
def say = { text -> println 'ZEUS export: ' + text }
def firstLine = { Throwable e -> // the innermost message: it names the file or reader that failed
    String text = null
    for (Throwable t = e; t != null; t = (t.getCause() == t ? null : t.getCause())) {
        if (t.getMessage() != null && !t.getMessage().trim().isEmpty())
            text = t.getMessage().trim()
    }
    if (text == null)
        text = e.getClass().getSimpleName()
    int nl = text.indexOf('\n')
    return nl < 0 ? text : text.substring(0, nl).trim()
}
def batchValue = { String name, def fallback ->
    try {
        return binding.hasVariable(name) ? binding.getVariable(name) : fallback
    } catch (Exception ignored) {
        return fallback
    }
}
// write through a temporary file in the same folder, then rename: never a half-written output
def writeAtomically = { File target, Closure writer ->
    File tmp = new File(target.getParentFile(), '.zeus-tmp-' + UUID.randomUUID() + '-' + target.getName())
    try {
        writer(tmp)
        try {
            Files.move(tmp.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING, StandardCopyOption.ATOMIC_MOVE)
        } catch (java.nio.file.AtomicMoveNotSupportedException ignored) {
            Files.move(tmp.toPath(), target.toPath(), StandardCopyOption.REPLACE_EXISTING)
        }
    } finally {
        Files.deleteIfExists(tmp.toPath())
    }
}
// Unicode code point order (as Python compares strings)
def byCodePoint = { String a, String b ->
    int i = 0
    int j = 0
    while (i < a.length() && j < b.length()) {
        int ca = a.codePointAt(i)
        int cb = b.codePointAt(j)
        if (ca != cb)
            return ca < cb ? -1 : 1
        i += Character.charCount(ca)
        j += Character.charCount(cb)
    }
    int ra = a.length() - i
    int rb = b.length() - j
    return ra == rb ? 0 : (ra < rb ? -1 : 1)
} as Comparator<String>
def classKey = { String name -> name.toLowerCase(Locale.ROOT) }
def hasArea = { p -> p.isAnnotation() && p.getROI() != null && p.getROI().isArea() && p.getROI().getArea() > 0 }
def mostCommon = { Map<String, Integer> counts ->
    String best = null
    counts.each { name, n -> if (best == null || n > counts[best]) best = name }
    return best
}
def safeName = { String name -> name.replaceAll('[\\\\/:*?"<>|]', '_') }

// ------------------------------------------------------------------------------------ what to export
def project = getProject()
def currentData = getCurrentImageData()
def currentEntry = getProjectEntry()
String outDir = OUTPUT_DIR
if (!outDir) {
    if (project == null) {
        say 'no project is open; set OUTPUT_DIR'
        return
    }
    outDir = project.getPath().getParent().resolve('export').toString()
}

int batchSize = (batchValue('qupath.script.batchSize', 1) as Integer) ?: 1
int batchIndex = (batchValue('qupath.script.batchIndex', 0) as Integer) ?: 0
if (ALL_IMAGES && project != null && batchSize > 1) {
    // Run for project: QuPath runs the script once per image; export the whole project at the first
    // image this run hands over (QuPath skips images it cannot open, so it need not be index 0)
    String run = project.getPath().toString() + '|' + batchSize
    String previous = System.getProperty('zeus.export.batch')
    boolean newRun = true
    if (previous != null && previous.startsWith(run + '|')) {
        int lastIndex = previous.substring(run.length() + 1) as Integer
        newRun = batchIndex <= lastIndex
    }
    System.setProperty('zeus.export.batch', run + '|' + batchIndex)
    if (!newRun) {
        String name = currentEntry != null ? currentEntry.getImageName() : 'this image'
        say "${name}: already exported with the whole project at the start of this Run for project"
        return
    }
}

def entries = []
if (ALL_IMAGES && project != null) {
    entries.addAll(project.getImageList())
} else if (currentData != null) {
    entries.add(currentEntry) // null when the open image is not in a project
} else {
    say 'no image is open'
    return
}
new File(outDir).mkdirs()

// one item per image to export: its name and annotations (the open image: with its unsaved changes)
def items = []
def skipped = []
def failed = []
for (def entry : entries) {
    boolean isCurrent = currentData != null && (entry == null || (currentEntry != null && entry.getID() == currentEntry.getID()))
    String imageName = entry != null ? entry.getImageName() : currentData.getServer().getMetadata().getName()
    try {
        def hierarchy = isCurrent ? currentData.getHierarchy() : null
        if (entry != null && !entry.hasImageData() && (hierarchy == null || hierarchy.isEmpty())) {
            say "${imageName}: skipped, never saved in QuPath (open it, import, save)"
            skipped.add(imageName)
            continue
        }
        if (hierarchy == null)
            hierarchy = entry.readHierarchy()
        items.add([entry: entry, name: imageName, current: isCurrent, annotations: new ArrayList(hierarchy.getAnnotationObjects())])
    } catch (Exception e) {
        say "${imageName}: failed, cannot read its saved data (${firstLine(e)})"
        failed.add(imageName)
    }
}

// ------------------------------------------------------------------------------------ labels
String positive = TUMOR_CLASS
if (!positive) {
    def published = new LinkedHashMap<String, Integer>()
    if (project != null) {
        def dataDir = project.getPath().getParent().resolve('data')
        for (def item : items) {
            if (item.entry == null)
                continue
            Path file = dataDir.resolve(item.entry.getID()).resolve('zeus_annotations.geojson')
            if (!Files.isRegularFile(file))
                continue
            try {
                PathIO.readObjects(file).each {
                    if (it.isAnnotation() && it.getPathClass() != null) {
                        String c = it.getPathClass().toString()
                        published[c] = (published[c] ?: 0) + 1
                    }
                }
            } catch (Exception e) {
                say "${item.name}: ZEUS's annotations cannot be read (${firstLine(e)}); not used to choose label 1"
            }
        }
    }
    positive = mostCommon(published)
    if (positive == null) {
        def named = new LinkedHashMap<String, Integer>()
        for (def item : items) {
            item.annotations.each {
                String n = it.getName()
                if (n != null && n.startsWith('ZEUS ')) {
                    String c = n.substring('ZEUS '.length())
                    named[c] = (named[c] ?: 0) + 1
                }
            }
        }
        positive = mostCommon(named)
    }
    if (positive == null)
        positive = 'Tumor'
}

def spellings = new TreeMap<String, TreeSet<String>>(byCodePoint)
for (def item : items) {
    item.annotations.each {
        if (hasArea(it) && it.getPathClass() != null) {
            String name = it.getPathClass().toString()
            if (!name.endsWith('*')) {
                String key = classKey(name)
                if (!spellings.containsKey(key))
                    spellings.put(key, new TreeSet<String>(byCodePoint))
                spellings.get(key).add(name)
            }
        }
    }
}
def labels = new LinkedHashMap<String, Integer>()
labels.put('background', 0)
int nextLabel = 1
def positiveNames = spellings.remove(classKey(positive))
if (positiveNames != null) {
    positiveNames.each { labels.put(it, 1) }
    nextLabel = 2
}
spellings.each { key, names ->
    names.each { labels.put(it, nextLabel) }
    nextLabel++
}
try {
    writeAtomically(new File(outDir, 'labels.json')) { File f -> f.setText(GsonTools.getInstance(true).toJson(labels), 'UTF-8') }
} catch (Exception e) {
    say "cannot write labels.json into ${outDir} (${firstLine(e)}); nothing exported"
    return
}

def labelServerFor = { imageData, double downsample ->
    def builder = new LabeledImageServer.Builder(imageData)
            .backgroundLabel(0)
            .downsample(downsample)
            .useFilter({ p -> hasArea(p) } as java.util.function.Predicate)
            .multichannelOutput(false)
    labels.each { name, label ->
        if (label > 0)
            builder.addLabel(name, label) // in label order: QuPath draws the higher labels on top
    }
    return builder.build()
}

// ------------------------------------------------------------------------------------ export
def withMask = []
def withoutMask = []
for (def item : items) {
    String base = safeName(item.name)
    File geojson = new File(outDir, base + '.geojson')
    File mask = new File(outDir, base + '-labels' + MASK_EXTENSION)
    try {
        writeAtomically(geojson) { File f -> exportObjectsToGeoJson(item.annotations, f.getPath(), 'FEATURE_COLLECTION') }
    } catch (Exception e) {
        say "${item.name}: failed, cannot write ${geojson.getName()} (${firstLine(e)})"
        failed.add(item.name)
        continue
    }
    def imageData = null
    String why = null
    try {
        imageData = item.current ? currentData : item.entry.readImageData()
        def labelServer = labelServerFor(imageData, DOWNSAMPLE) // QuPath 0.6 opens the image file here
        writeAtomically(mask) { File f -> writeImage(labelServer, f.getPath()) }
    } catch (Exception e) {
        why = firstLine(e)
    } catch (LinkageError e) { // an image reader that cannot load on this computer
        why = firstLine(e)
    }
    if (why == null && EXPORT_TILES && !item.annotations.isEmpty()) {
        try {
            String tileDir = new File(new File(outDir, 'tiles'), base).getPath()
            mkdirs(tileDir)
            new TileExporter(imageData)
                    .downsample(TILE_DOWNSAMPLE)
                    .tileSize(TILE_SIZE)
                    .overlap(TILE_OVERLAP)
                    .imageExtension(TILE_EXTENSION)
                    .labeledImageExtension('.png')
                    .labeledServer(labelServerFor(imageData, TILE_DOWNSAMPLE))
                    .annotatedTilesOnly(true)
                    .writeTiles(tileDir)
        } catch (Exception e) {
            say "${item.name}: tiles not (all) exported (${firstLine(e)})"
        }
    }
    if (imageData != null && !item.current) {
        try {
            imageData.getServer().close() // release the file reader of an image read from the project
        } catch (Exception ignored) {
            // closing is only housekeeping (and the server may never have opened)
        }
    }
    if (why == null) {
        withMask.add(item.name)
        say "${item.name}: ${item.annotations.size()} annotation(s) and label mask exported"
    } else {
        boolean removed = mask.isFile() && mask.delete()
        withoutMask.add(item.name)
        say "${item.name}: ${item.annotations.size()} annotation(s) exported, no label mask: cannot open the image (${why})" +
                (removed ? '; the older mask was removed' : '')
    }
}

// outlines this Java changes (java.awt.geom.Area of Java 25.0.3 and 26.0.1, JDK-8386576): a simple polygon whose
// geometry, which the GeoJSON files hold, lost the area or the single part of its own vertices (what QuPath shows)
int changedOutlines = items.sum(0) { item -> item.annotations.count { o ->
    def roi = o.getROI()
    if (!(roi instanceof PolygonROI) || roi.getNumPoints() < 3)
        return false
    def coords = roi.getAllPoints().collect { new Coordinate(it.getX(), it.getY()) }
    coords.add(new Coordinate(coords[0]))
    def own
    try {
        own = GeometryTools.getDefaultFactory().createPolygon(coords as Coordinate[])
    } catch (Exception e) {
        return false
    }
    if (!own.isValid() || own.getArea() <= 0)
        return false // e.g. a self-crossing outline drawn by hand: QuPath repairs it on purpose
    def g = roi.getGeometry()
    return g.getNumGeometries() != 1 || Math.abs(g.getArea() - own.getArea()) > 1e-6 * own.getArea()
} }
if (changedOutlines > 0)
    say "WARNING: QuPath runs on Java ${System.getProperty('java.version')}, whose java.awt.geom.Area changes large " +
        "outlines (JDK-8386576; Java 25.0.3 and 26.0.1): ${changedOutlines} outline(s) in the exported GeoJSON (not the " +
        "masks) are not the ones QuPath shows; run QuPath on its own bundled Java, or a Java without this bug " +
        "(e.g. 25.0.2), and export again"

String summary = "done: ${withMask.size()} image(s) with label mask, ${withoutMask.size()} without (image not opened" +
        (withoutMask ? ': ' + withoutMask.join(', ') : '') + "), ${skipped.size()} skipped (never saved), " +
        "${failed.size()} failed" + (failed ? ' (' + failed.join(', ') + ')' : '') + "; written to ${outDir}; labels: ${labels}"
say summary
