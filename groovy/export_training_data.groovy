/*
 * export_training_data.groovy -- export the (corrected) annotations of a project for training.
 *
 * Written for QuPath 0.4, 0.5 and 0.6 (also runs on 0.7).
 *
 * What it does, for every image of the project (ALL_IMAGES = true: run it once with Run; it reads
 * each image's saved data, so save the open image first) or for the current image only
 * (ALL_IMAGES = false: use Run > Run for project):
 *   - <OUTPUT_DIR>/<imageName>.geojson: all annotations as a GeoJSON FeatureCollection
 *     (exportObjectsToGeoJson(..., "FEATURE_COLLECTION")); ZEUS names and measurements are kept,
 *     so `zeus export` can tell annotator-corrected objects from untouched ZEUS ones
 *     (`zeus export <project> --out DIR` reads these files from <project>/export);
 *   - <OUTPUT_DIR>/<imageName>-labels<MASK_EXTENSION>: a label mask at DOWNSAMPLE drawn from the
 *     annotations (LabeledImageServer): background 0, TUMOR_CLASS 1, the other classes 2, 3, ...
 *     in alphabetical order; classes ending in '*' (QuPath's Ignore*, Region*)
 *     are not labelled; the mask needs the image file, so it is left out (with a message) when the
 *     image cannot be opened on this computer; the GeoJSON needs only the saved data;
 *   - <OUTPUT_DIR>/labels.json: the label of each class, the same for every image of the project;
 *   - with EXPORT_TILES: image tiles and matching label tiles of the annotated areas
 *     (TileExporter) in <OUTPUT_DIR>/tiles/<imageName>/.
 * Images that were never saved in QuPath (so the ZEUS annotations were never imported into them)
 * are skipped: exporting them would look as if every ZEUS annotation had been deleted.
 *
 * Parameters (edit below):
 *   OUTPUT_DIR      '' = <project folder>/export
 *   ALL_IMAGES      true = every image of the project; false = the current image only
 *   DOWNSAMPLE      downsample of the label mask (16 = 1/16 of the full resolution in x and y)
 *   MASK_EXTENSION  '.png' (use '.ome.tif' for very large masks)
 *   TUMOR_CLASS     the class that gets label 1 (compared ignoring case)
 *   EXPORT_TILES    false; true = also export tiles
 *   TILE_SIZE, TILE_DOWNSAMPLE, TILE_OVERLAP, TILE_EXTENSION   tile export settings
 */

import qupath.lib.images.servers.LabeledImageServer
import qupath.lib.images.writers.TileExporter
import qupath.lib.io.GsonTools

import static qupath.lib.scripting.QP.*

// ------------------------------------------------------------------------------------ parameters
String OUTPUT_DIR = ''
boolean ALL_IMAGES = true
double DOWNSAMPLE = 16.0
String MASK_EXTENSION = '.png'
String TUMOR_CLASS = 'Tumor'
boolean EXPORT_TILES = false
int TILE_SIZE = 512
double TILE_DOWNSAMPLE = 1.0
int TILE_OVERLAP = 0
String TILE_EXTENSION = '.jpg'

// ------------------------------------------------------------------------------------ what to export
def project = getProject()
String outDir = OUTPUT_DIR
if (!outDir) {
    if (project == null) {
        println 'ZEUS export: no project is open; set OUTPUT_DIR'
        return
    }
    outDir = project.getPath().getParent().resolve('export').toString()
}
mkdirs(outDir)

def entries = []
if (ALL_IMAGES && project != null) {
    entries.addAll(project.getImageList())
} else if (getCurrentImageData() != null) {
    entries.add(null) // null = the current image
} else {
    println 'ZEUS export: no image is open'
    return
}

// classes present in the annotations: of the whole project when there is one, so labels agree
def classNames = new TreeSet<String>()
def collectClasses = { hierarchy ->
    hierarchy.getAnnotationObjects().each {
        def pc = it.getPathClass()
        if (pc != null && !pc.toString().endsWith('*'))
            classNames.add(pc.toString())
    }
}
if (project != null) {
    project.getImageList().each {
        if (it.hasImageData())
            collectClasses(it.readHierarchy())
    }
    if (!ALL_IMAGES && getCurrentImageData() != null)
        collectClasses(getCurrentImageData().getHierarchy()) // unsaved changes of the open image
} else {
    collectClasses(getCurrentImageData().getHierarchy())
}
def labels = new LinkedHashMap<String, Integer>()
labels.put('background', 0)
def tumor = classNames.find { it.equalsIgnoreCase(TUMOR_CLASS) }
if (tumor != null)
    labels.put(tumor, 1)
int nextLabel = 2
for (String name : classNames) {
    if (name != tumor)
        labels.put(name, nextLabel++)
}
new File(outDir, 'labels.json').setText(GsonTools.getInstance(true).toJson(labels), 'UTF-8')

def safeName = { String name -> name.replaceAll('[\\\\/:*?"<>|]', '_') }
def labelServerFor = { imageData, double downsample ->
    def builder = new LabeledImageServer.Builder(imageData)
            .backgroundLabel(0)
            .downsample(downsample)
            .useAnnotations()
            .multichannelOutput(false)
    labels.each { name, label ->
        if (label > 0)
            builder.addLabel(name, label)
    }
    return builder.build()
}

// ------------------------------------------------------------------------------------ export
int done = 0
int skipped = 0
for (def entry : entries) {
    String imageName = entry == null ? (getProjectEntry() != null ? getProjectEntry().getImageName() :
            getCurrentImageData().getServer().getMetadata().getName()) : entry.getImageName()
    if (entry != null && !entry.hasImageData()) {
        println "ZEUS export: ${imageName}: skipped, never saved in QuPath (open it, import, save)"
        skipped++
        continue
    }
    String base = safeName(imageName)
    def hierarchy = entry == null ? getCurrentImageData().getHierarchy() : entry.readHierarchy()
    def annotations = hierarchy.getAnnotationObjects()
    exportObjectsToGeoJson(annotations, new File(outDir, base + '.geojson').getPath(), 'FEATURE_COLLECTION')

    def imageData = null
    try {
        imageData = entry == null ? getCurrentImageData() : entry.readImageData()
    } catch (Exception e) {
        println "ZEUS export: ${imageName}: annotations exported, no label mask (cannot open the image: ${e.getMessage()})"
    }
    if (imageData != null) {
        writeImage(labelServerFor(imageData, DOWNSAMPLE), new File(outDir, base + '-labels' + MASK_EXTENSION).getPath())
        if (EXPORT_TILES && !annotations.isEmpty()) {
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
        }
        if (entry != null) {
            try {
                imageData.getServer().close() // release the file reader of an image read from the project
            } catch (Exception ignored) {
                // closing is only housekeeping
            }
        }
    }
    done++
    println "ZEUS export: ${imageName}: ${annotations.size()} annotation(s) exported"
}
println "ZEUS export: ${done} image(s) written to ${outDir}, ${skipped} skipped (labels: ${labels})"
